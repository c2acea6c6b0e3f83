"""The typed config tree: frozen dataclasses, each field's range declared beside it.

A field is declared and range-checked in one place: ``k: int = field(default=8, metadata=POSITIVE)``
(:func:`~harness.config.convert.check` builds the metadata, :func:`~harness.config.convert.build`
applies it to every value given in a file). Rules that span several fields are in
:mod:`harness.config.checks`. Comments say what a field means and its units; what the shipped
defaults cost is measured in docs/performance.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.config.convert import apply_overrides, check


def at_least(low: float, note: str = "") -> dict[str, Any]:
    return check(lambda v: v >= low, f"must be >= {low}{note}")


POSITIVE = check(lambda v: v is None or v > 0, "must be > 0")  # None: an optional field unset
NON_NEGATIVE = at_least(0)
FRACTION = check(lambda v: 0 < v <= 1, "must be in (0, 1]")
BELOW_ONE = check(lambda v: 0 <= v < 1, "must be in [0, 1)")
DISTINCT = check(lambda v: len(v) > 0 and len(set(v)) == len(v), "non-empty, distinct")
# Where the harness writes: no '..' segment, so a sweep file cannot aim its output (results,
# checkpoints, packed data, `--overwrite`'s rmtree) above the directory it names.
NO_PARENT = check(lambda v: v is None or ".." not in Path(v).parts, "must not contain a '..' segment")


def _urls_ok(v: Any) -> bool:
    return v is None or (isinstance(v, str) and "{split}" in v) or (
        isinstance(v, dict) and set(v) == {"train", "val", "test"} and all(isinstance(u, str) for u in v.values()))


def known_strategies() -> list[str]:
    from harness.modes import known_strategies  # imports torch: validation only, never in a trial

    return known_strategies()


# ---------------------------------------------------------------- one trial's sections
@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"  # digits | shapes | folder:PATH | npz:PATH
    image_size: int = field(default=16, metadata=POSITIVE)
    count: int | None = field(default=None, metadata=POSITIVE)  # shapes only: number of images generated
    shard_size: int = field(default=500, metadata=POSITIVE)
    split: tuple[float, float, float] = field(default=(0.8, 0.1, 0.1), metadata=check(
        lambda v: abs(sum(v) - 1) < 1e-6 and min(v) >= 0, "three fractions >= 0 that sum to 1"))
    # where packed shards are cached; default <output_dir>/../_data
    root: str | None = field(default=None, metadata=NO_PARENT)
    # shard URLs overriding root: one pattern where {split} becomes train/val/test, or a mapping
    # split -> pattern; brace ranges ({00000..00049}), file:// and pipe: (object stores) work
    urls: str | dict[str, str] | None = field(default=None, metadata=check(
        _urls_ok, "one pattern containing {split}, or a mapping of train, val and test to patterns"))
    shuffle_buffer: int = field(default=256, metadata=POSITIVE)
    num_workers: int = field(default=0, metadata=NON_NEGATIVE)  # DataLoader workers per Ray Train worker
    on_bad_sample: Literal["raise", "skip"] = "raise"
    # shapes only: k shapes of distinct classes per image, or k drawn from [lo, hi] (docs/data.md);
    # null packs the source's default (1) under the cache key it always had
    shapes_per_image: int | tuple[int, int] | None = None
    masks: bool = False  # stream the per-pixel class masks (method.perception.tasks: segment)
    # scarce labels: the perception loss sees the labels (and masks) of this fraction of the
    # training images only, chosen by a hash of each sample's key and label_seed (the same images
    # in every epoch, worker split, arm and training seed); the rest train generation
    # unconditionally and may be scored by the teacher (docs/data.md, "Scarce labels")
    labelled_fraction: float = field(default=1.0, metadata=FRACTION)
    label_seed: int = 0


@dataclass(frozen=True)
class ModelSection:
    preset: str = "digits16"
    overrides: dict[str, Any] = field(default_factory=dict)  # any genrep.model.ModelConfig field


@dataclass(frozen=True)
class McConfig:
    """The Monte Carlo teacher (Bayes posterior over classes from the diffusion errors e_c). It
    costs B·K·C network forwards per step in full; the cost fields below (every, subset, prune_k,
    prune_keep) cut that to B·subset·(prune_k·C + (K − prune_k)·prune_keep)/every. What the shipped
    defaults cost, measured: docs/performance.md, P3."""

    k: int = field(default=8, metadata=POSITIVE)  # Monte Carlo draws (t, ε) per image, shared by all classes
    # temperature of the Bayes posterior softmax(−e_c/τ + log prior): a number, or "auto" =
    # temperature scaling (Guo et al. 2017): τ fitted by the teacher's NLL on the first
    # `calibrate_images` labelled *training* images (labels every arm has: harness.teacher) at the
    # first teacher step, then after `calibrate_first`
    # steps, the gap doubling up to `calibrate_every` (0: once, at the start): τ moves fastest
    # early. One fit costs calibrate_images·K·C forwards.
    tau: float | Literal["auto"] = field(default="auto", metadata=check(
        lambda v: v == "auto" or v > 0, 'must be > 0 or "auto"'))
    calibrate_first: int = field(default=10, metadata=at_least(1))  # steps
    calibrate_every: int = field(default=500, metadata=NON_NEGATIVE)  # steps
    calibrate_images: int = field(default=32, metadata=POSITIVE)
    # e_c on the ELBO's scale: "sum" over pixels (log p(x|c) ≈ −e_c); "mean" = the earlier
    # pixel-mean estimator, whose τ = 1 is τ = D on the Bayes scale (a near-uniform teacher)
    scale: Literal["sum", "mean"] = "sum"
    weight: Literal["uniform", "elbo"] = "uniform"  # time weighting w(t) of the errors
    prior: Literal["uniform", "train"] = "uniform"  # "train": the training split's class frequencies
    # "forward": K forward-noised draws per image (the Diffusion Classifier's estimator);
    # "reverse_chain": the states of one null-label reverse chain per image as MCMC samples
    # (GenRep's estimator; docs/method.md): chain_steps steps, the first burn_in states dropped,
    # then every thin-th kept (the paper: 200, 50, 2); eta: the DDIM step's noise (1 = DDPM-like)
    estimator: Literal["forward", "reverse_chain"] = "forward"
    chain_steps: int = field(default=200, metadata=check(lambda v: 1 <= v <= 1000, "must be in [1, 1000]"))
    burn_in: int = field(default=50, metadata=NON_NEGATIVE)
    thin: int = field(default=2, metadata=at_least(1))
    eta: float = field(default=1.0, metadata=check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    # the chain's first timestep: None = T−1 (the paper's chain, from pure noise); lower keeps the
    # chain tied to the image (from T−1 its states forget x: docs/performance.md, P3c)
    chain_start: int | None = field(default=None, metadata=check(
        lambda v: v is None or 0 <= v <= 999, "must be null or in [0, 999]"))
    # run the teacher every N steps (in between: no distillation term)
    every: int = field(default=4, metadata=POSITIVE)
    subset: float = field(default=0.125, metadata=FRACTION)  # fraction of the batch the teacher scores
    # network inputs per batched teacher forward: bounds peak memory (larger chunks spend CPU in
    # page faults: docs/performance.md, P3)
    chunk_size: int = field(default=256, metadata=POSITIVE)
    # adaptive pruning: first-round draws over all classes, then the rest only for the best
    # prune_keep classes (when prune_k < k and prune_keep < classes; null/null switches it off)
    prune_k: int | None = field(default=2, metadata=POSITIVE)
    prune_keep: int | None = field(default=3, metadata=POSITIVE)
    teacher: Literal["online", "ema"] = "online"
    # what is distilled: "bayes", the network's own Bayes posterior from its denoising errors (the
    # estimator above); "self", the self-training control: the EMA head's own predictions
    # softmax(z_ema/τ) on the same rows and schedule, τ fitted on its logits (docs/method.md)
    source: Literal["bayes", "self"] = "bayes"


@dataclass(frozen=True)
class TaskWeights:
    # w_cls and w_seg of L_perc = w_cls·(L_ce + β·L_kd) + w_seg·L_seg
    classify: float = field(default=1.0, metadata=NON_NEGATIVE)
    segment: float = field(default=1.0, metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class PerceptionConfig:
    """The perception tasks and their weights within L_perc (docs/method.md, "Dense perception").

    ``segment`` adds the model's segmentation head (``seg_head`` follows from this list, it is
    not a model override) and needs ``data.masks: true``. These weights mix the perception tasks;
    a strategy's ``task_weights`` then weigh L_perc against L_gen.
    """

    tasks: tuple[Literal["classify", "segment"], ...] = field(default=("classify",), metadata=DISTINCT)
    weights: TaskWeights = field(default_factory=TaskWeights)
    # λ_dice of L_seg = L_ce,pixel + λ_dice·L_dice
    dice_weight: float = field(default=0.0, metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class SemanticConfig:
    """Semantic-driven generation and representation alignment (docs/method.md, "Two stages and
    semantic-driven generation (harness)"). Either switch gives the model its semantic module
    (``ModelConfig.semantic``) and the trial a semantic network: an EMA copy of the unified
    network whose pooled perception features x_sem condition the generation loss."""

    enabled: bool = False  # semantic-driven generation: a mean correction and a variance factor from x_sem
    # REPA weight of the representation-alignment term; > 0 switches it on
    rep_align: float = field(default=0.0, metadata=NON_NEGATIVE)
    # weight of the variational-bound term that trains the variance factor
    vlb_weight: float = field(default=1e-3, metadata=NON_NEGATIVE)
    # m of θ_sem ← m·θ_sem + (1−m)·θ, after every optimizer step of stage 2
    ema_decay: float = field(default=0.999, metadata=BELOW_ONE)
    # where x_sem comes from while sampling: the semantic net's features of the step's x̂_0, or of x_t
    inference: Literal["x0_hat", "x_t"] = "x0_hat"

    @property
    def on(self) -> bool:
        """Does the trial need the semantic module and the semantic network?"""
        return self.enabled or self.rep_align > 0


@dataclass(frozen=True)
class MethodConfig:
    p_uncond: float = field(default=0.1, metadata=BELOW_ONE)  # label dropout: the null class with this probability
    use_ce: bool = True
    # weight of the distillation loss; 0 switches the teacher off
    beta_kd: float = field(default=1.0, metadata=NON_NEGATIVE)
    tau_kd: float = field(default=1.0, metadata=POSITIVE)
    # ε of label smoothing in L_ce (Szegedy et al. 2016): the control that tells a teacher's
    # distillation apart from uniform smoothing of the targets
    label_smoothing: float = field(default=0.0, metadata=BELOW_ONE)
    ema_decay: float = field(default=0.999, metadata=BELOW_ONE)
    mc: McConfig = field(default_factory=McConfig)
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "sum"
    granularity: Literal["vector", "tensor"] = "vector"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. rule, power, align, task_weights


@dataclass(frozen=True)
class TrainConfig:
    steps: int = field(default=60, metadata=POSITIVE)
    batch_size: int = field(default=64, metadata=POSITIVE)  # global batch: split evenly over the workers
    lr: float = field(default=2e-3, metadata=POSITIVE)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)
    # 0 = off (DeepSpeed's own default would silently be 1.0)
    grad_clip: float = field(default=0.0, metadata=NON_NEGATIVE)
    log_every: int = field(default=10, metadata=POSITIVE)  # steps
    checkpoint_every: int = field(default=0, metadata=NON_NEGATIVE)  # steps; 0 = only at the end
    # stage 1: the first N steps train perception alone (L_perc, no teacher, no strategy); stage 2
    # is the joint training from step N on (docs/method.md); 0 = no stage 1
    stage1_steps: int = field(default=0, metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class EvalConfig:
    # held-out split scored (reported); anything chosen is chosen on val (τ, guidance "auto"), so
    # comparisons report on test (docs/evaluation.md, "What is chosen on which split")
    split: str = field(default="val", metadata=check(lambda v: v in ("val", "test"), "val or test"))
    # also evaluate every N training steps, from step 0 (the untrained baseline) on; 0: end only
    every: int = field(default=0, metadata=NON_NEGATIVE)
    # what those evaluations during training score: "all" (as the final one), or "perception"
    # (the heads and the held-out denoising loss only: no zero-shot classifier, no guidance
    # choice, no samples, so a curve of head accuracy costs N·4 forwards a point); the final
    # evaluation always scores everything
    every_metrics: Literal["all", "perception"] = "all"
    mc_k: int = field(default=8, metadata=POSITIVE)  # draws of the zero-shot diffusion classifier
    # held-out images it scores, or "all" of the split (B·K·C network evaluations)
    mc_images: int | Literal["all"] = field(default=64, metadata=check(
        lambda v: v == "all" or v > 0, 'must be > 0 or "all"'))
    # class-conditional DDIM samples for fd_ref, kid_ref and sample_acc
    samples_per_class: int = field(default=10, metadata=POSITIVE)
    ddim_steps: int = field(default=20, metadata=POSITIVE)
    # classifier-free guidance through the null class; "auto": per evaluation, the scale of
    # guidance_choices with the lowest guidance_by between val images and guidance_samples_per_class
    # samples a class (seed 1), then the reported samples use it: Σ_s C·n·steps·(2 if s ≠ 1) forwards more
    guidance_scale: float | Literal["auto"] = field(default=1.0, metadata=check(
        lambda v: v == "auto" or v >= 0, 'must be >= 0 or "auto"'))
    guidance_choices: tuple[float, ...] = field(default=(1.0, 2.0, 3.0), metadata=check(
        lambda v: len(v) > 0 and min(v) >= 0 and len(set(v)) == len(v), "non-empty, distinct, each >= 0"))
    guidance_by: Literal["fd_ref", "kid_ref"] = "fd_ref"
    # None: samples_per_class
    guidance_samples_per_class: int | None = field(default=None, metadata=POSITIVE)


@dataclass(frozen=True)
class DeepSpeedConfig:
    # across the data-parallel ranks; one rank runs stage 0 (harness.engine)
    zero_stage: int = field(default=0, metadata=check(lambda v: v in (0, 1, 2, 3), "must be 0, 1, 2 or 3"))
    # keep zero_stage even on one rank, where it partitions nothing (benchmarks: perf P1)
    zero_on_one_rank: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass(frozen=True)
class ResourcesConfig:
    workers: int = field(default=1, metadata=POSITIVE)  # Ray Train workers (data-parallel ranks) per trial
    cpus_per_worker: float = field(default=0.99, metadata=POSITIVE)
    gpus_per_worker: float = field(default=0.0, metadata=NON_NEGATIVE)
    max_concurrent: int = field(default=2, metadata=POSITIVE)  # trials at once
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray Train retries of a crashed worker group
    max_failures: int = field(default=1, metadata=at_least(-1, " (-1 = forever)"))


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; built by :meth:`SweepConfig.trial`."""

    name: str
    seed: int
    strategy: StrategyConfig
    data: DataConfig
    model: ModelSection
    method: MethodConfig
    train: TrainConfig
    eval: EvalConfig
    deepspeed: DeepSpeedConfig
    resources: ResourcesConfig
    output_dir: str
    variant: str = ""  # the trial's label in the results: a variant's name, or the strategy's

    def __post_init__(self):
        if not self.variant:
            object.__setattr__(self, "variant", self.strategy.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """Stable 12-hex-digit id of the resolved config (same config → same hash)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def model_config(self):
        """The network's config: the preset, its overrides, the seg head when ``segment`` is a
        perception task and the semantic module when ``method.semantic`` is on (the one place
        that decides both)."""
        from genrep.model import preset

        return preset(self.model.preset, **self.model.overrides,
                      seg_head="segment" in self.method.perception.tasks,
                      semantic=self.method.semantic.on)


# ---------------------------------------------------------------- what a sweep adds
@dataclass(frozen=True)
class VariantConfig:
    """A named arm: a strategy plus fixed overrides, e.g. ``sum_kd: {strategy: sum, overrides:
    {method.beta_kd: 1.0}}``; its name is the trial's label (``strategy`` column) in the results."""

    strategy: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted TrialConfig path -> value


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
class PreregistrationConfig:
    """What the comparison decides before it runs (docs/evaluation.md, "Pre-registered
    statistics"): primary metrics, the baseline arm, the compared arms, an equivalence margin per
    primary metric (its units), α, the power the minimum detectable effect is stated at, and the
    number of paired seeds. Stored in every result row's config; harness.report reads it there."""

    primary: tuple[str, ...] = field(metadata=DISTINCT)
    baseline: str
    margins: dict[str, float]
    comparisons: tuple[str, ...] = ()  # default: every arm but the baseline
    alpha: float = field(default=0.05, metadata=check(lambda v: 0 < v < 0.5, "must be in (0, 0.5)"))
    power: float = field(default=0.8, metadata=check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    seeds: int = field(default=5, metadata=at_least(2, " (a paired t test needs two seeds)"))
    ablation: tuple[AblationRow, ...] = ()  # the paper's ablation rows, in the paper's order
    paper_direction: dict[str, dict[str, str]] = field(default_factory=dict)  # row -> metric -> up|down

    def resolved(self, arms: tuple[str, ...]) -> PreregistrationConfig:
        """The section with its default filled in: ``comparisons`` = every arm but the baseline."""
        rest = tuple(a for a in arms if a != self.baseline)
        return dataclasses.replace(self, comparisons=self.comparisons or rest)


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
    strategies: tuple[str, ...] = field(default_factory=lambda: tuple(known_strategies()), metadata=DISTINCT)
    seeds: tuple[int, ...] = field(default=(0,), metadata=DISTINCT)
    strategy_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per strategy name
    granularity: Literal["vector", "tensor"] = "vector"
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
    preregistration: PreregistrationConfig | None = None
    source_file: str = "<dict>"

    def trial(self, strategy: str, seed: int) -> TrialConfig:
        return TrialConfig(
            name=self.name, seed=seed,
            strategy=StrategyConfig(strategy, self.granularity, dict(self.strategy_options.get(strategy, {}))),
            data=self.data, model=self.model, method=self.method, train=self.train,
            eval=self.eval, deepspeed=self.deepspeed, resources=self.resources,
            output_dir=self.output_dir, variant=strategy)

    def labels(self) -> tuple[str, ...]:
        """The arms: every strategy, then every named variant."""
        return (*self.strategies, *self.variants)

    def arm(self, label: str, seed: int, overrides: dict[str, Any] | None = None) -> TrialConfig:
        """The trial of a strategy or a named variant, with grid or search ``overrides`` on top."""
        v = self.variants.get(label)
        trial = self.trial(v.strategy if v else label, seed)
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
