"""Search mode: Optuna's TPE over a declared space, run by Ray Tune, seeds averaged, study on disk.

The sweep file's ``search:`` section (harness.config.SearchConfig) becomes
``ConcurrencyLimiter(SeedRepeater(OptunaSearch(...)))``: Optuna samples a configuration (dotted
TrialConfig paths → values, passed to the trial as ``params["overrides"]``), the configuration
runs once per seed, and Optuna is told each objective's mean over the seeds. One objective
(``metric``/``mode``, default head_acc ↑) or several (``metrics``/``modes``: multi-objective TPE,
a Pareto front). Objectives are read off each trial's final report (the held-out split, plus the
mean ``step_time`` of the run). The study lives in SQLite under the output directory
(``<output_dir>/ray/optuna.db``, study name = sweep name), so ``--resume`` continues it and
``optuna`` tools can read it. An optional ASHA scheduler stops weak trials early on a train-row
metric (``acc``: the head's batch accuracy), since the held-out metrics only exist at the end.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.search import Repeater
from ray.tune.search.repeater import TRIAL_INDEX

from harness import metrics
from harness.config import ParamSpec, SweepConfig

log = logging.getLogger("harness")
PREFIX = "overrides/"  # Tune unflattens "overrides/method.mc.k" into {"overrides": {"method.mc.k": v}}


def study_path(cfg: SweepConfig) -> Path:
    return Path(cfg.output_dir).resolve() / "ray" / "optuna.db"


def objectives(cfg: SweepConfig) -> tuple[str | list[str], str | list[str]]:
    """(metric, mode) as OptunaSearch takes them: strings for one objective, lists for several;
    a mode not given is the metric's direction in the registry (harness.metrics)."""
    s, direction = cfg.search, metrics.objectives()
    if s.metrics:
        return list(s.metrics), list(s.modes) or [direction[m] for m in s.metrics]
    metric = s.metric or "head_acc"
    return metric, s.mode or direction[metric]


def distribution(spec: ParamSpec):
    """The Optuna distribution of one ParamSpec (int bounds inclusive)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if spec.type == "categorical":
        return CategoricalDistribution(list(spec.choices))
    if spec.type == "int":
        return IntDistribution(int(spec.low), int(spec.high), log=spec.log)
    return FloatDistribution(spec.low, spec.high, log=spec.log)


def searcher(cfg: SweepConfig):
    """SeedRepeater(OptunaSearch) over cfg.search.space, the study persisted in SQLite."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = study_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    metric, mode = objectives(cfg)
    space = {PREFIX + p: distribution(spec) for p, spec in cfg.search.space.items()}
    base = OptunaSearch(space=space, metric=metric, mode=mode, study_name=cfg.name,
                        storage=optuna.storages.RDBStorage(f"sqlite:///{path}"), seed=cfg.search.seed)
    return SeedRepeater(base, seeds=list(cfg.seeds))


def scheduler(cfg: SweepConfig):
    """ASHA on ``step`` (the training step of each train row), or None.

    stop_last_trials=False: otherwise ASHA stops every trial at its last train row (step =
    max_t), before the final held-out evaluation that the objectives come from.
    """
    s = cfg.search.scheduler if cfg.search else None
    if s is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", metric=s.metric, mode=s.mode, max_t=cfg.train.steps,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                         stop_last_trials=False)


def num_trials(cfg: SweepConfig) -> int:
    """Tune's num_samples: every sampled configuration runs once per seed."""
    return cfg.search.num_samples * len(cfg.seeds)


class SeedRepeater(Repeater):
    """Ray Tune's Repeater with the repeats as the sweep's seeds, and several objectives.

    Each configuration Optuna samples runs once per seed (``params["seed"]``); Optuna is told
    the mean of each objective over the seeds that reported it. Repeater itself handles one
    metric only (``metric not in result`` fails for a list). A group where no seed reported an
    objective is told as failed (every seed errored) or pruned (stopped early by ASHA).
    """

    def __init__(self, searcher, seeds: list[int]):
        super().__init__(searcher, repeat=len(seeds), set_index=True)
        self.seeds = seeds

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config["seed"] = self.seeds[config.pop(TRIAL_INDEX)]
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        group = self._trial_id_to_group[trial_id]
        names = self._names()
        group.report(trial_id, [float((result or {}).get(m, math.nan)) for m in names])
        if not group.finished_reporting():
            return
        scores = np.asarray(group.scores(), dtype=float)  # [seeds, objectives]
        if np.isnan(scores).all(axis=0).any():
            self.searcher.on_trial_complete(group.primary_trial_id, result=None, error=error)
            return
        means = np.nanmean(scores, axis=0)
        told = {m: float(v) for m, v in zip(names, means)}
        log.warning("search: configuration %s -> %s over %d seed(s)", group.config.get("overrides"),
                    told, len(scores))
        self.searcher.on_trial_complete(group.primary_trial_id, result=told, error=False)

    def _names(self) -> list[str]:
        metric = self.searcher.metric
        return list(metric) if isinstance(metric, (list, tuple)) else [metric]
