"""What a sweep adds around its trials: named variants, an Optuna search, the pre-registration
(its family of comparisons, controls, pilot) and the :class:`SweepConfig` itself, each field's
range declared beside it as in :mod:`harness.config.schema` (one trial's sections).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from harness.config.convert import apply_overrides, check
from harness.config.schema import (DISTINCT, NO_PARENT, NON_NEGATIVE, POSITIVE, UNIQUE, DataConfig,
                                   DeepSpeedConfig, EvalConfig, InitConfig, MethodConfig,
                                   ModelSection, ResourcesConfig, StrategyConfig, TrainConfig,
                                   TrialConfig, at_least, known_strategies)


@dataclass(frozen=True)
class VariantConfig:
    """A named arm: a strategy plus fixed overrides, e.g. ``sum_kd: {strategy: sum, overrides:
    {method.beta_kd: 1.0}}``; its name is the trial's label (``strategy`` column) in the results."""

    strategy: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted TrialConfig path -> value
    # the arm's seed i is the sweep's seed i plus this: an A/A control (the baseline's config under
    # another label, docs/evaluation.md, "Controls") draws other noise and is paired by index
    seed_offset: int = field(default=0, metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class ParamSpec:
    """One searched dimension: float/int in [low, high] (optionally log-scaled) or categorical."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None


# train-row metrics an early-stopping scheduler can watch
TRAIN_METRICS = ("acc", "loss_ce", "loss_perc", "loss_gen", "loss_seg", "seg_acc")


@dataclass(frozen=True)
class SchedulerConfig:
    """ASHA early stopping, judged on the train rows reported every ``train.log_every`` steps."""

    type: Literal["asha"] = "asha"
    # a train-row metric: the final held-out metrics only exist at the end
    metric: str = field(default="acc", metadata=check(lambda v: v in TRAIN_METRICS,
                                                      f"one of {list(TRAIN_METRICS)}"))
    mode: Literal["max", "min"] = "max"
    grace_period: int = field(default=20, metadata=POSITIVE)  # training steps before a trial can be stopped
    reduction_factor: int = field(default=2, metadata=at_least(2))


@dataclass(frozen=True)
class SearchConfig:
    """Optuna (TPE) over ``space`` (dotted TrialConfig path -> ParamSpec); each sampled
    configuration runs once per seed and Optuna is told the mean over seeds."""

    space: dict[str, ParamSpec]
    # configurations sampled (Tune runs num_samples x len(seeds) trials)
    num_samples: int = field(default=12, metadata=POSITIVE)
    metric: str | None = None  # single objective (default head_acc) ...
    mode: Literal["max", "min"] | None = None
    metrics: tuple[str, ...] = ()  # ... or several: a Pareto front (multi-objective TPE)
    modes: tuple[Literal["max", "min"], ...] = ()
    seed: int = 0  # the TPE sampler's seed
    scheduler: SchedulerConfig | None = None


@dataclass(frozen=True)
class AblationRow:
    """One row of the paper-shaped ablation table: an arm of the sweep under the paper's row name,
    compared with row ``vs`` (default: the first row, the paper's baseline)."""

    arm: str
    row: str
    vs: str | None = None


@dataclass(frozen=True)
class Comparison:
    """One registered comparison, a triple of the family: Δ = arm − reference on one held-out
    metric, paired on seeds (e.g. ``{arm: kd, reference: kd_self, metric: head_acc}``)."""

    arm: str
    reference: str
    metric: str


@dataclass(frozen=True)
class PositiveControl:
    """An arm made worse by a known mechanism (e.g. ``data.label_noise: 0.4``): the report must
    call it ``expect`` against the baseline on ``metric``, or the run cannot be trusted."""

    arm: str
    metric: str = "head_acc"
    expect: Literal["worse", "better"] = "worse"


@dataclass(frozen=True)
class ControlsConfig:
    """The run's controls, registered in the family like any comparison against the baseline."""

    # the A/A arm: a variant with the baseline's config and a seed_offset; on every primary metric
    # the report must call it neither better nor worse
    aa: str | None = None
    positive: PositiveControl | None = None


@dataclass(frozen=True)
class PilotConfig:
    """The pilot that sized the run (``genrep-bench pilot``: docs/sweeps.md). ``seeds`` is what
    the pilot runs; the rest is what it measured, copied from its output into the file and
    checked at load time against the registered seeds, margins and MDEs."""

    seeds: int = field(default=3, metadata=at_least(2, " (a paired SD needs two seeds)"))
    # metric -> the SD of the paired differences arm − reference over the pilot's seeds
    paired_sd: dict[str, float] = field(default_factory=dict)
    wall_s_per_trial: float | None = field(default=None, metadata=POSITIVE)  # seconds
    seeds_chosen: int | None = field(default=None, metadata=check(
        lambda v: v is None or v >= 2, "must be >= 2"))
    measured_on: str | None = None  # when, where and on which commit the pilot ran


@dataclass(frozen=True)
class PreregistrationConfig:
    """What the comparison decides before it runs (docs/evaluation.md, "Pre-registered
    statistics"): the family of comparisons as (arm, reference, metric) triples, an equivalence
    margin per metric (its units), α, the power the minimum detectable effect is stated at, the
    number of paired seeds, the controls and the pilot that sized the run. Stored in every
    result row's config; harness.report reads it there.

    The family (:meth:`triples`): every ``comparisons`` arm × every ``primary`` metric against
    the ``baseline`` (the shorthand, and the only form before triples), then the ``family``
    triples as written, then the controls against the baseline (the A/A arm on every primary
    metric, the positive control on its metric). Holm runs over all of them."""

    baseline: str
    margins: dict[str, float]
    primary: tuple[str, ...] = field(default=(), metadata=UNIQUE)  # default: the family's metrics
    # default (with no family triples): every arm but the baseline and the controls
    comparisons: tuple[str, ...] = ()
    family: tuple[Comparison, ...] = ()
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    alpha: float = field(default=0.05, metadata=check(lambda v: 0 < v < 0.5, "must be in (0, 0.5)"))
    power: float = field(default=0.8, metadata=check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    seeds: int = field(default=5, metadata=at_least(2, " (a paired t test needs two seeds)"))
    # metric -> the true Δ the run is sized to detect at α/m with `power` (the pilot's target;
    # a metric without one is sized for its margin)
    mde: dict[str, float] = field(default_factory=dict)
    pilot: PilotConfig | None = None
    ablation: tuple[AblationRow, ...] = ()  # the paper's ablation rows, in the paper's order
    paper_direction: dict[str, dict[str, str]] = field(default_factory=dict)  # row -> metric -> up|down
    # arm -> seed offset, filled by resolved() from the variants (the report pairs by index)
    seed_offsets: dict[str, int] = field(default_factory=dict)

    def control_arms(self) -> tuple[str, ...]:
        """The arms registered as controls: the A/A arm, the positive control's arm."""
        c = self.controls
        return tuple(a for a in (c.aa, c.positive.arm if c.positive else None) if a)

    def resolved(self, arms: tuple[str, ...], offsets: dict[str, int] | None = None) -> PreregistrationConfig:
        """The section as stored with the results: ``comparisons`` filled in (every arm but the
        baseline and the controls, when neither comparisons nor family triples are given) and
        each arm's seed offset (``SweepConfig.seed_offsets``)."""
        rest = tuple(a for a in arms if a != self.baseline and a not in self.control_arms())
        comparisons = self.comparisons or (() if self.family else rest)
        return dataclasses.replace(self, comparisons=comparisons, seed_offsets=dict(offsets or {}))

    def metrics(self) -> tuple[str, ...]:
        """The primary metrics: ``primary``, else the family triples' metrics in order."""
        return self.primary or tuple(dict.fromkeys(c.metric for c in self.family))

    def triples(self) -> tuple[Comparison, ...]:
        """The whole family, in order: shorthand, family, A/A, positive control."""
        c = self.controls
        out = [Comparison(a, self.baseline, m) for a in self.comparisons for m in self.metrics()]
        out += self.family
        out += [Comparison(c.aa, self.baseline, m) for m in self.metrics()] if c.aa else []
        out += [Comparison(c.positive.arm, self.baseline, c.positive.metric)] if c.positive else []
        return tuple(out)

    def alpha_first(self) -> float:
        """α/m: the level Holm tests the family's first (smallest-p) comparison at, m triples."""
        return self.alpha / max(len(self.triples()), 1)


def _plain_value(v: Any) -> Any:
    """Tuples (at any depth) as lists: what YAML and JSON write."""
    if isinstance(v, dict):
        return {k: _plain_value(x) for k, x in v.items()}
    return [_plain_value(x) for x in v] if isinstance(v, (list, tuple)) else v


@dataclass(frozen=True)
class SweepConfig:
    name: str = field(metadata=check(lambda v: v.replace("-", "").replace("_", "").isalnum(),
                                     "letters, digits, '-' and '_' only"))
    output_dir: str = field(default="results", metadata=NO_PARENT)
    # [] runs the variants alone (e.g. a pilot of two variants: harness.pilot)
    strategies: tuple[str, ...] = field(default_factory=lambda: tuple(known_strategies()), metadata=UNIQUE)
    seeds: tuple[int, ...] = field(default=(0,), metadata=DISTINCT)
    strategy_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per strategy name
    granularity: Literal["vector", "tensor"] = "vector"
    scope: Literal["all", "attention"] = "all"  # every trial's strategy.scope
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    grid: dict[str, Any] = field(default_factory=dict)  # dotted TrialConfig path -> list of values
    variants: dict[str, VariantConfig] = field(default_factory=dict)
    search: SearchConfig | None = None
    init: InitConfig = field(default_factory=InitConfig)  # the backbone every trial starts from
    preregistration: PreregistrationConfig | None = None
    source_file: str = "<dict>"

    def trial(self, strategy: str, seed: int) -> TrialConfig:
        return TrialConfig(
            name=self.name, seed=seed,
            strategy=StrategyConfig(strategy, self.granularity, dict(self.strategy_options.get(strategy, {})),
                                    self.scope),
            data=self.data, model=self.model, method=self.method, train=self.train,
            eval=self.eval, deepspeed=self.deepspeed, resources=self.resources,
            output_dir=self.output_dir, variant=strategy, init=self.init)

    def labels(self) -> tuple[str, ...]:
        """The arms: every strategy, then every named variant."""
        return (*self.strategies, *self.variants)

    def seed_offsets(self) -> dict[str, int]:
        """Arm -> its seed offset, for the arms that have one (``VariantConfig.seed_offset``)."""
        return {label: v.seed_offset for label, v in self.variants.items() if v.seed_offset}

    def arm(self, label: str, seed: int, overrides: dict[str, Any] | None = None) -> TrialConfig:
        """The trial of a strategy or a named variant, with grid or search ``overrides`` on top."""
        v = self.variants.get(label)
        trial = self.trial(v.strategy if v else label, seed + (v.seed_offset if v else 0))
        return apply_overrides(dataclasses.replace(trial, variant=label),
                               {**(v.overrides if v else {}), **(overrides or {})})

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the ``grid:`` values ([{}] without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def trials(self) -> list[TrialConfig]:
        """Arms × seeds × grid points (a search's sampled values are not known in advance)."""
        return [self.arm(label, seed, point) for label in self.labels() for seed in self.seeds
                for point in self.grid_points()]

    def plain(self) -> dict[str, Any]:
        """The sweep's template as a plain mapping, lists for tuples (YAML- and JSON-safe): every
        field but grid, variants, search, preregistration and source_file, so ``from_dict`` takes
        it back as a sweep of its strategies alone (override checks, perf's spawned ranks)."""
        skip = ("grid", "variants", "search", "preregistration", "source_file")
        return {k: _plain_value(v) for k, v in asdict(self).items() if k not in skip}
