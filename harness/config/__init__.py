"""The typed config tree: a sweep file, validated at construction.

YAML lives only in ``sweeps/``; :func:`load` reads a file once (safe loader, duplicate keys refused)
and :func:`from_dict` turns the mapping into frozen dataclasses, rejecting unknown keys, wrong types
and out-of-range values with an error naming the file and the field path
(``sweeps/x.yaml: train.steps: must be > 0``). One trial is a :class:`TrialConfig`: the sweep's
template with one strategy and one seed (and any grid or search values) filled in. Every result
row stores the resolved trial config.

Beyond strategies × seeds a sweep may cross a ``grid:`` of dotted TrialConfig paths
(``method.beta_kd: [0.0, 1.0]``), add named ``variants:`` (a strategy plus fixed overrides, labelled
by their own name in the results), or ``search:`` a declared space with Optuna (harness.search).
Every override is validated at load time as if it had been written into the file, and so is each
trial's set of overrides together. The driver validates once; each trial gets its arm's resolved
TrialConfig and rebuilds it with :func:`trial_from_dict`, without sweep-level checks.

Modules, each importing only those above it: ``convert`` (mapping → dataclass, ConfigError,
overrides), ``schema`` (one trial's dataclasses, each field's range beside it), ``sweep_schema``
(what a sweep adds: variants, search, pre-registration, SweepConfig), ``registration`` (the
pre-registration's rules), ``checks`` (the rules across fields), ``parse`` (YAML, ``from_dict``,
``load``).
"""
from harness.config.checks import FIXED_FIELDS, ZERO3, check_override
from harness.config.convert import ConfigError, apply_overrides, check, replace_path
from harness.config.parse import Loaded, from_dict, load, preregistration_from_dict, trial_from_dict
from harness.config.schema import (DataConfig, DeepSpeedConfig, EvalConfig, InitConfig, McConfig,
                                   MethodConfig, ModelSection, PerceptionConfig, PretrainConfig,
                                   ResourcesConfig, SemanticConfig, StrategyConfig, TaskWeights,
                                   TrainConfig, TrialConfig)
from harness.config.sweep_schema import (TRAIN_METRICS, AblationRow, Comparison, ControlsConfig,
                                         ParamSpec, PilotConfig, PositiveControl,
                                         PreregistrationConfig, SchedulerConfig, SearchConfig,
                                         SweepConfig, VariantConfig)

__all__ = [
    "FIXED_FIELDS", "TRAIN_METRICS", "ZERO3", "AblationRow", "ConfigError", "DataConfig",
    "DeepSpeedConfig", "EvalConfig", "InitConfig", "Loaded", "McConfig", "MethodConfig", "ModelSection",
    "ParamSpec", "PerceptionConfig", "PreregistrationConfig", "PretrainConfig", "ResourcesConfig", "SchedulerConfig",
    "SearchConfig", "SemanticConfig", "StrategyConfig", "SweepConfig", "TaskWeights", "TrainConfig",
    "TrialConfig", "VariantConfig", "apply_overrides", "check", "check_override", "from_dict",
    "load", "preregistration_from_dict", "replace_path", "trial_from_dict",
    "Comparison", "ControlsConfig", "PilotConfig", "PositiveControl",
]
