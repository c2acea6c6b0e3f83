"""The typed config tree: a sweep file, validated at construction.

YAML lives only in ``sweeps/``; it is read with ``yaml.safe_load`` and turned into frozen
dataclasses by :func:`from_dict`, which rejects unknown keys, wrong types and out-of-range values
with an error naming the file and the field path (``sweeps/x.yaml: train.steps: must be > 0``).
One trial is a :class:`TrialConfig`: the sweep's template with one strategy and one seed (and any
grid or search values) filled in. Every result row stores the resolved trial config.

Beyond strategies × seeds a sweep may cross a ``grid:`` of dotted TrialConfig paths
(``method.beta_kd: [0.0, 1.0]``), add named ``variants:`` (a strategy plus fixed overrides, labelled
by their own name in the results), or ``search:`` a declared space with Optuna (harness.search).
Every override is validated here, at load time, as if it had been written into the file, and so is
each trial's set of overrides together. The driver validates once; each trial gets its arm's
resolved TrialConfig and rebuilds it with :func:`trial_from_dict`, without sweep-level checks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.metrics import objectives


class ConfigError(ValueError):
    """A bad sweep file; the message names the file and the field path."""


# ---------------------------------------------------------------- the tree
@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"  # digits | shapes | folder:PATH | npz:PATH
    image_size: int = 16
    count: int | None = None  # shapes only: number of images generated
    shard_size: int = 500
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    root: str | None = None  # where packed shards are cached; default <output_dir>/../_data
    # shard URLs overriding root: one pattern where {split} becomes train/val/test, or a mapping
    # split -> pattern; brace ranges ({00000..00049}), file:// and pipe: (object stores) work
    urls: str | dict[str, str] | None = None
    shuffle_buffer: int = 256
    num_workers: int = 0  # DataLoader workers per Ray Train worker
    on_bad_sample: Literal["raise", "skip"] = "raise"
    # shapes only: k shapes of distinct classes per image, or k drawn from [lo, hi] (docs/data.md);
    # null packs the source's default (1) under the cache key it always had
    shapes_per_image: int | tuple[int, int] | None = None
    masks: bool = False  # stream the per-pixel class masks (method.perception.tasks: segment)
    # scarce labels: the perception loss sees the labels (and masks) of this fraction of the
    # training images only, chosen by a hash of each sample's key and label_seed (the same images
    # in every epoch, worker split, arm and training seed); the rest train generation
    # unconditionally and may be scored by the teacher (docs/data.md, "Scarce labels")
    labelled_fraction: float = 1.0
    label_seed: int = 0


@dataclass(frozen=True)
class ModelSection:
    preset: str = "digits16"
    overrides: dict[str, Any] = field(default_factory=dict)  # any genrep.model.ModelConfig field


@dataclass(frozen=True)
class McConfig:
    k: int = 8  # Monte Carlo draws (t, ε) per image, shared by all classes
    # temperature of the Bayes posterior softmax(−e_c/τ + log prior): a number, or "auto" =
    # temperature scaling (Guo et al. 2017): τ fitted by the teacher's NLL on `calibrate_images`
    # labelled images of the val split at the first teacher step, then after `calibrate_first`
    # steps, the gap doubling up to `calibrate_every` (0: once, at the start): τ moves fastest
    # early. One fit costs calibrate_images·K·C forwards, 2,560 for 32 digits at K = 8: every
    # 100 steps that was 1.82x a step without teacher against 1.39x for the teacher alone (perf P3)
    tau: float | Literal["auto"] = "auto"
    calibrate_first: int = 10
    calibrate_every: int = 500
    calibrate_images: int = 32
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
    chain_steps: int = 200
    burn_in: int = 50
    thin: int = 2
    eta: float = 1.0
    # the chain's first timestep: None = T−1 (the paper's chain, from pure noise); lower keeps the
    # chain tied to the image (from T−1 its states forget x: perf P3c, docs/method.md)
    chain_start: int | None = None
    # Shipped cost defaults, measured in docs/performance.md (P3, P3b): the teacher scores an
    # eighth of the batch every 4th step and prunes to 3 classes after the 2 middle draws,
    # B/8·(2·C + 6·3)/4 ≈ 1.2·B forwards per step instead of B·K·C = 80·B; one image costs the
    # teacher ~9x what it costs the training step, so this is ~1.3x a step without distillation
    # (subset 0.25 measured 1.66x on digits16).
    every: int = 4  # run the teacher every N steps (in between: no distillation term)
    subset: float = 0.125  # fraction of the batch the teacher scores
    # 256 inputs: larger chunks spend as much CPU in page faults as in the forward (2048: 2×)
    chunk_size: int = 256  # network inputs per batched teacher forward (bounds peak memory)
    prune_k: int | None = 2  # adaptive pruning: first-round draws over all classes ...
    prune_keep: int | None = 3  # ... then the rest only for the best this many classes
    # (pruning applies when prune_k < k and prune_keep < classes; null/null switches it off)
    teacher: Literal["online", "ema"] = "online"


@dataclass(frozen=True)
class TaskWeights:
    classify: float = 1.0  # w_cls of L_perc = w_cls·(L_ce + β·L_kd) + w_seg·L_seg
    segment: float = 1.0  # w_seg


@dataclass(frozen=True)
class PerceptionConfig:
    """The perception tasks and their weights within L_perc (docs/method.md, "Dense perception").

    ``segment`` adds the model's segmentation head (``seg_head`` follows from this list, it is
    not a model override) and needs ``data.masks: true``. These weights mix the perception tasks;
    a strategy's ``task_weights`` then weigh L_perc against L_gen.
    """

    tasks: tuple[Literal["classify", "segment"], ...] = ("classify",)
    weights: TaskWeights = field(default_factory=TaskWeights)
    dice_weight: float = 0.0  # λ_dice of L_seg = L_ce,pixel + λ_dice·L_dice


@dataclass(frozen=True)
class SemanticConfig:
    """Semantic-driven generation and representation alignment (docs/method.md, "Two stages and
    semantic-driven generation (harness)"). Either switch gives the model its semantic module
    (``ModelConfig.semantic``) and the trial a semantic network: an EMA copy of the unified
    network whose pooled perception features x_sem condition the generation loss."""

    enabled: bool = False  # semantic-driven generation: a mean correction and a variance factor from x_sem
    rep_align: float = 0.0  # REPA weight of the representation-alignment term; > 0 switches it on
    vlb_weight: float = 1e-3  # weight of the variational-bound term that trains the variance factor
    ema_decay: float = 0.999  # m of θ_sem ← m·θ_sem + (1−m)·θ, after every optimizer step of stage 2
    # where x_sem comes from while sampling: the semantic net's features of the step's x̂_0, or of x_t
    inference: Literal["x0_hat", "x_t"] = "x0_hat"

    @property
    def on(self) -> bool:
        """Does the trial need the semantic module and the semantic network?"""
        return self.enabled or self.rep_align > 0


@dataclass(frozen=True)
class MethodConfig:
    p_uncond: float = 0.1  # label dropout: the null class with this probability
    use_ce: bool = True
    beta_kd: float = 1.0  # weight of the distillation loss; 0 switches the teacher off
    tau_kd: float = 1.0
    # ε of label smoothing in L_ce (Szegedy et al. 2016): the control that tells a teacher's
    # distillation apart from uniform smoothing of the targets
    label_smoothing: float = 0.0
    ema_decay: float = 0.999
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
    steps: int = 60
    batch_size: int = 64  # global batch: split evenly over the workers
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off (DeepSpeed's own default would silently be 1.0)
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    # stage 1: the first N steps train perception alone (L_perc, no teacher, no strategy); stage 2
    # is the joint training from step N on (docs/method.md); 0 = no stage 1
    stage1_steps: int = 0


@dataclass(frozen=True)
class EvalConfig:
    # held-out split scored (reported); anything chosen is chosen on val (τ, guidance "auto"), so
    # comparisons report on test (docs/evaluation.md, "What is chosen on which split")
    split: str = "val"
    # also evaluate every N training steps, from step 0 (the untrained baseline) on; 0: end only
    every: int = 0
    # what those evaluations during training score: "all" (as the final one), or "perception"
    # (the heads and the held-out denoising loss only: no zero-shot classifier, no guidance
    # choice, no samples, so a curve of head accuracy costs N·4 forwards a point); the final
    # evaluation always scores everything
    every_metrics: Literal["all", "perception"] = "all"
    mc_k: int = 8  # draws of the zero-shot diffusion classifier
    # held-out images it scores, or "all" of the split (B·K·C network evaluations)
    mc_images: int | Literal["all"] = 64
    samples_per_class: int = 10  # class-conditional DDIM samples for fd_ref, kid_ref and sample_acc
    ddim_steps: int = 20
    # classifier-free guidance through the null class; "auto": per evaluation, the scale of
    # guidance_choices with the lowest guidance_by between val images and guidance_samples_per_class
    # samples a class (seed 1), then the reported samples use it: Σ_s C·n·steps·(2 if s ≠ 1) forwards more
    guidance_scale: float | Literal["auto"] = 1.0
    guidance_choices: tuple[float, ...] = (1.0, 2.0, 3.0)
    guidance_by: Literal["fd_ref", "kid_ref"] = "fd_ref"
    guidance_samples_per_class: int | None = None  # None: samples_per_class


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 0  # across the data-parallel ranks; one rank runs stage 0 (harness.engine)
    # keep zero_stage even on one rank, where it partitions nothing (benchmarks: perf P1)
    zero_on_one_rank: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass(frozen=True)
class ResourcesConfig:
    workers: int = 1  # Ray Train workers (data-parallel ranks) per trial
    cpus_per_worker: float = 0.99
    gpus_per_worker: float = 0.0
    max_concurrent: int = 2
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 1  # Ray Train retries of a crashed worker group


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


@dataclass(frozen=True)
class SchedulerConfig:
    """ASHA early stopping, judged on the train rows reported every ``train.log_every`` steps."""

    type: Literal["asha"] = "asha"
    metric: str = "acc"  # a train-row metric: the final held-out metrics only exist at the end
    mode: Literal["max", "min"] = "max"
    grace_period: int = 20  # training steps before a trial can be stopped
    reduction_factor: int = 2


@dataclass(frozen=True)
class SearchConfig:
    """Optuna (TPE) over ``space`` (dotted TrialConfig path -> ParamSpec); each sampled
    configuration runs once per seed and Optuna is told the mean over seeds."""

    space: dict[str, ParamSpec]
    num_samples: int = 12  # configurations sampled (Tune runs num_samples x len(seeds) trials)
    metric: str | None = None  # single objective (default head_acc) ...
    mode: Literal["max", "min"] | None = None
    metrics: tuple[str, ...] = ()  # ... or several: a Pareto front (multi-objective TPE)
    modes: tuple[Literal["max", "min"], ...] = ()
    seed: int = 0  # the TPE sampler's seed
    scheduler: SchedulerConfig | None = None


# train-row metrics an early-stopping scheduler can watch
TRAIN_METRICS = ("acc", "loss_ce", "loss_perc", "loss_gen", "loss_seg", "seg_acc")


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

    primary: tuple[str, ...]
    baseline: str
    margins: dict[str, float]
    comparisons: tuple[str, ...] = ()  # default: every arm but the baseline
    alpha: float = 0.05
    power: float = 0.8
    seeds: int = 5
    ablation: tuple[AblationRow, ...] = ()  # the paper's ablation rows, in the paper's order
    paper_direction: dict[str, dict[str, str]] = field(default_factory=dict)  # row -> metric -> up|down

    def resolved(self, arms: tuple[str, ...]) -> "PreregistrationConfig":
        """The section with its default filled in: ``comparisons`` = every arm but the baseline."""
        rest = tuple(a for a in arms if a != self.baseline)
        return dataclasses.replace(self, comparisons=self.comparisons or rest)


@dataclass(frozen=True)
class SweepConfig:
    name: str
    output_dir: str = "results"
    strategies: tuple[str, ...] = field(default_factory=lambda: tuple(_known_strategies()))
    seeds: tuple[int, ...] = (0,)
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


# ---------------------------------------------------------------- overrides
def replace_path(obj, path: list[str], value):
    """A copy of a frozen dataclass tree with the field at ``path`` set to ``value``."""
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, head: replace_path(obj.get(head, {}), rest, value) if rest else value}
    current = getattr(obj, head)
    return dataclasses.replace(obj, **{head: replace_path(current, rest, value) if rest else value})


def apply_overrides(trial: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    """``{dotted.path: value}`` applied to a trial, then rebuilt so every value has its field's
    type (a grid's ``1`` for a float field becomes ``1.0``: the config hash stays canonical)."""
    if not overrides:
        return trial
    for path, value in overrides.items():
        trial = replace_path(trial, path.split("."), value)
    return trial_from_dict(trial.to_dict())


# ---------------------------------------------------------------- checks
def _positive(*names):
    return {n: (lambda v: v is None or v > 0, "must be > 0") for n in names}


# Where the harness writes: no '..' segment, so a sweep file cannot aim its output (results,
# checkpoints, packed data, `--overwrite`'s rmtree) above the directory it names.
NO_PARENT = (lambda v: v is None or ".." not in Path(v).parts, "must not contain a '..' segment")


CHECKS: dict[type, dict[str, tuple[Any, str]]] = {
    DataConfig: {**_positive("image_size", "count", "shard_size", "shuffle_buffer"),
                 "urls": (lambda v: v is None or (isinstance(v, str) and "{split}" in v) or (
                     isinstance(v, dict) and set(v) == {"train", "val", "test"}
                     and all(isinstance(u, str) for u in v.values())),
                          "one pattern containing {split}, or a mapping of train, val and test "
                          "to patterns"),
                 "root": NO_PARENT,
                 "num_workers": (lambda v: v >= 0, "must be >= 0"),
                 "labelled_fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
                 "split": (lambda v: abs(sum(v) - 1) < 1e-6 and min(v) >= 0,
                           "three fractions >= 0 that sum to 1")},
    McConfig: {**_positive("k", "every", "chunk_size", "prune_k", "prune_keep", "calibrate_images"),
               "tau": (lambda v: v == "auto" or v > 0, 'must be > 0 or "auto"'),
               "calibrate_every": (lambda v: v >= 0, "must be >= 0"),
               "calibrate_first": (lambda v: v >= 1, "must be >= 1"),
               "chain_steps": (lambda v: 1 <= v <= 1000, "must be in [1, 1000]"),
               "chain_start": (lambda v: v is None or 0 <= v <= 999, "must be null or in [0, 999]"),
               "burn_in": (lambda v: v >= 0, "must be >= 0"),
               "thin": (lambda v: v >= 1, "must be >= 1"),
               "eta": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
               "subset": (lambda v: 0 < v <= 1, "must be in (0, 1]")},
    PerceptionConfig: {"tasks": (lambda v: len(v) > 0 and len(set(v)) == len(v), "non-empty, distinct"),
                       "dice_weight": (lambda v: v >= 0, "must be >= 0")},
    TaskWeights: {"classify": (lambda v: v >= 0, "must be >= 0"),
                  "segment": (lambda v: v >= 0, "must be >= 0")},
    MethodConfig: {"p_uncond": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
                   "beta_kd": (lambda v: v >= 0, "must be >= 0"),
                   **_positive("tau_kd"),
                   "label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
                   "ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)")},
    SemanticConfig: {"rep_align": (lambda v: v >= 0, "must be >= 0"),
                     "vlb_weight": (lambda v: v >= 0, "must be >= 0"),
                     "ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)")},
    TrainConfig: {**_positive("steps", "batch_size", "lr", "log_every"),
                  "grad_clip": (lambda v: v >= 0, "must be >= 0"),
                  "warmup_steps": (lambda v: v >= 0, "must be >= 0"),
                  "checkpoint_every": (lambda v: v >= 0, "must be >= 0"),
                  "stage1_steps": (lambda v: v >= 0, "must be >= 0")},
    EvalConfig: {**_positive("mc_k", "samples_per_class", "ddim_steps", "guidance_samples_per_class"),
                 "mc_images": (lambda v: v == "all" or v > 0, 'must be > 0 or "all"'),
                 "guidance_scale": (lambda v: v == "auto" or v >= 0, 'must be >= 0 or "auto"'),
                 "guidance_choices": (lambda v: len(v) > 0 and min(v) >= 0 and len(set(v)) == len(v),
                                      "non-empty, distinct, each >= 0"),
                 "every": (lambda v: v >= 0, "must be >= 0"),
                 "split": (lambda v: v in ("val", "test"), "val or test")},
    DeepSpeedConfig: {"zero_stage": (lambda v: v in (0, 1, 2, 3), "must be 0, 1, 2 or 3")},
    SearchConfig: _positive("num_samples"),
    PreregistrationConfig: {
        "primary": (lambda v: len(v) > 0 and len(set(v)) == len(v), "non-empty, distinct"),
        "alpha": (lambda v: 0 < v < 0.5, "must be in (0, 0.5)"),
        "power": (lambda v: 0 < v < 1, "must be in (0, 1)"),
        "seeds": (lambda v: v >= 2, "must be >= 2 (a paired t test needs two seeds)")},
    SchedulerConfig: {**_positive("grace_period"),
                      "reduction_factor": (lambda v: v >= 2, "must be >= 2"),
                      "metric": (lambda v: v in TRAIN_METRICS, f"one of {list(TRAIN_METRICS)}")},
    ResourcesConfig: {**_positive("workers", "cpus_per_worker", "max_concurrent"),
                      "gpus_per_worker": (lambda v: v >= 0, "must be >= 0"),
                      "max_failures": (lambda v: v >= -1, "must be >= -1 (-1 = forever)")},
    SweepConfig: {"output_dir": NO_PARENT,
                  "seeds": (lambda v: len(v) > 0 and len(set(v)) == len(v), "non-empty, distinct"),
                  "strategies": (lambda v: len(v) > 0 and len(set(v)) == len(v),
                                 "non-empty, distinct"),
                  "name": (lambda v: v.replace("-", "").replace("_", "").isalnum(),
                           "letters, digits, '-' and '_' only")},
}


def _known_strategies() -> list[str]:
    from harness.modes import known_strategies  # imports torch: validation only, never in a trial

    return known_strategies()


# ZeRO-3 is refused here, before Ray starts, with the reason harness.engine gives
ZERO3 = ("deepspeed.zero_stage: 3 is not supported: ZeRO-3 partitions the parameters outside the "
         "engine's forward, and the per-task gradients are taken through engine.module; use stage "
         "0, 1 or 2")


def _cross_checks(cfg: SweepConfig, where: str) -> None:
    """Checks that span several fields, in one place."""
    from genrep import strategies

    known = _known_strategies()
    for s in cfg.strategies:
        if s not in known:
            raise ConfigError(f"{where}: strategies: unknown strategy {s!r}; known: {sorted(known)}")
    _check_model(cfg.model, where)
    if cfg.deepspeed.zero_stage == 3:
        raise ConfigError(f"{where}: {ZERO3}")
    if cfg.train.batch_size % cfg.resources.workers:
        raise ConfigError(f"{where}: train.batch_size: {cfg.train.batch_size} is not divisible by "
                          f"resources.workers = {cfg.resources.workers}")
    mc = cfg.method.mc
    if (mc.prune_k is None) != (mc.prune_keep is None):
        raise ConfigError(f"{where}: method.mc: prune_k and prune_keep go together")
    if mc.burn_in >= mc.chain_steps:
        raise ConfigError(f"{where}: method.mc.burn_in: {mc.burn_in} leaves no state of a "
                          f"{mc.chain_steps}-step chain (must be < chain_steps)")
    if mc.chain_start is not None and mc.chain_start < mc.chain_steps - 1:
        raise ConfigError(f"{where}: method.mc.chain_start: {mc.chain_start} is below chain_steps − 1 = "
                          f"{mc.chain_steps - 1}: a {mc.chain_steps}-step chain needs distinct timesteps")
    if not cfg.method.use_ce and cfg.method.beta_kd == 0:
        raise ConfigError(f"{where}: method: use_ce is false and beta_kd is 0: no perception loss")
    _check_dense(cfg, where)
    _check_semantic(cfg, where)
    _check_eval_splits(cfg, where)
    from harness import modes

    for s, opts in cfg.strategy_options.items():
        if s not in modes.known_strategies():
            raise ConfigError(f"{where}: strategy_options.{s}: not a strategy; "
                              f"known: {modes.known_strategies()}")
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: strategy_options.{s}: expected a mapping, got {opts!r}")
        try:
            modes.check_options(s, opts)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: strategy_options.{s}: {e}") from None
    _check_grid(cfg, where)
    _check_variants(cfg, where)
    _check_combinations(cfg, where)
    _check_search(cfg, where)
    _check_preregistration(cfg, where)


MASK_SOURCES = ("shapes",)  # sources that pack per-pixel class masks (docs/data.md)


def _check_dense(cfg: SweepConfig, where: str) -> None:
    """Dense perception: masks only from a source that packs them, ``segment`` only with masks,
    the seg head only through ``method.perception.tasks``, the teacher only with ``classify``."""
    d, p = cfg.data, cfg.method.perception
    if d.shapes_per_image is not None and d.source != "shapes":
        raise ConfigError(f"{where}: data.shapes_per_image: only the shapes source takes it, "
                          f"not data.source {d.source!r}")
    if d.masks and not d.urls and d.source not in MASK_SOURCES:
        raise ConfigError(f"{where}: data.masks: data.source {d.source!r} packs no masks; "
                          f"sources with masks: {list(MASK_SOURCES)}")
    if "segment" in p.tasks and not d.masks:
        raise ConfigError(f"{where}: method.perception.tasks: segment needs data.masks: true "
                          "(the per-pixel targets)")
    if "seg_head" in cfg.model.overrides:
        raise ConfigError(f"{where}: model.overrides.seg_head: set by method.perception.tasks "
                          "(segment adds the head); remove it here")
    if "classify" not in p.tasks and cfg.method.beta_kd != 0:
        raise ConfigError(f"{where}: method.beta_kd: the teacher distils into the classification "
                          "head, and method.perception.tasks has no classify; set beta_kd: 0")


def _check_semantic(cfg: SweepConfig, where: str) -> None:
    """Two stages and semantic-driven generation: stage 1 shorter than the run, the semantic
    module only through ``method.semantic``, and neither in a mode that shares no network."""
    from harness import modes

    t, sem = cfg.train, cfg.method.semantic
    if t.stage1_steps >= t.steps:
        raise ConfigError(f"{where}: train.stage1_steps: {t.stage1_steps} leaves no step of stage 2 "
                          f"(must be < train.steps = {t.steps})")
    if t.stage1_steps and not cfg.method.use_ce and "segment" not in cfg.method.perception.tasks:
        raise ConfigError(f"{where}: train.stage1_steps: stage 1 trains perception without the "
                          "teacher, and method.use_ce is false with no segment task: it would "
                          "have no loss")
    if "semantic" in cfg.model.overrides:
        raise ConfigError(f"{where}: model.overrides.semantic: set by method.semantic (enabled or "
                          "rep_align > 0 adds the module); remove it here")
    used = [f for f, on in (("method.semantic.enabled", sem.enabled),
                            ("method.semantic.rep_align", sem.rep_align > 0),
                            ("train.stage1_steps", t.stage1_steps > 0)) if on]
    # a variant with overrides is checked with its own strategy (check_override), one without here
    arms = [*cfg.strategies, *(v.strategy for v in cfg.variants.values() if not v.overrides)]
    for s in arms:
        if used and not modes.is_joint(s):
            raise ConfigError(f"{where}: {used[0]}: not available with strategy {s!r}: its two "
                              "networks share nothing, so there is no unified network whose "
                              "perception could drive its generation, nor one to pre-train in a "
                              "stage 1; use a joint strategy")


def _check_eval_splits(cfg: SweepConfig, where: str) -> None:
    """Nothing is chosen on the reported split: the guidance choice and a search's objectives are
    read on val, so with either the evaluation must report on test (docs/evaluation.md)."""
    e = cfg.eval
    if e.guidance_scale == "auto" and e.split != "test":
        raise ConfigError(f"{where}: eval.guidance_scale: \"auto\" chooses the scale on the val split, "
                          f"and eval.split: {e.split} would report on the images it was chosen on; "
                          "set eval.split: test, or a fixed scale")
    if cfg.search is not None and e.split == "test":
        raise ConfigError(f"{where}: eval.split: test with search: the search would choose its "
                          "configuration by the test split's metrics; search on val (eval.split: "
                          "val), then evaluate the chosen configuration on test in a sweep of its own")


# ---------------------------------------------------------------- model overrides
TIMESTEPS = 1000  # T of genrep.diffusion.make_scheduler: t_perception is a timestep in [0, T)
MODEL_CHECKS = {
    **_positive("image_size", "channels", "num_classes", "layers_per_block", "norm_num_groups",
                "dit_depth", "dit_heads", "dit_head_dim", "dit_patch", "head_hidden"),
    "block_out_channels": (lambda v: len(v) > 0 and min(v) > 0, "must be a non-empty list of integers > 0"),
    "head": (lambda v: v in ("linear", "mlp"), "must be linear or mlp"),
    "t_perception": (lambda v: 0 <= v < TIMESTEPS, f"must be in [0, {TIMESTEPS})"),
}


def _check_model(model: ModelSection, where: str) -> None:
    """The preset; each override by the type and range of its genrep.model.ModelConfig field; then
    the sizes the backbone needs, blamed on an override where one is involved."""
    from genrep.model import BACKBONES, PRESETS, ModelConfig

    if model.preset not in PRESETS:
        raise ConfigError(f"{where}: model.preset: unknown {model.preset!r}; known: {sorted(PRESETS)}")
    hints, over = typing.get_type_hints(ModelConfig), {}
    for key, value in model.overrides.items():
        at = f"model.overrides.{key}"
        if key not in hints:
            raise ConfigError(f"{where}: {at}: unknown field; known: {sorted(hints)}")
        over[key] = _convert(hints[key], value, at, where)
        ok, msg = MODEL_CHECKS.get(key, (lambda v: True, ""))
        if not ok(over[key]):
            raise ConfigError(f"{where}: {at}: {msg}, got {value!r}")
    m = dataclasses.replace(PRESETS[model.preset], **over)

    def fail(keys: tuple[str, ...], msg: str) -> ConfigError:
        at = next((f"model.overrides.{k}" for k in keys if k in over), f"model.preset {model.preset!r}")
        return ConfigError(f"{where}: {at}: {msg}")

    if m.backbone not in BACKBONES:
        raise fail(("backbone",), f"unknown backbone {m.backbone!r}; known: {BACKBONES.names()}")
    if m.backbone == "unet":  # n levels halve the image n - 1 times; GroupNorm splits channels
        down = 2 ** (len(m.block_out_channels) - 1)
        if m.image_size % down:
            raise fail(("image_size", "block_out_channels"), f"image_size {m.image_size} is not "
                       f"divisible by 2^(levels - 1) = {down} (block_out_channels {m.block_out_channels})")
        if any(c % m.norm_num_groups for c in m.block_out_channels):
            raise fail(("norm_num_groups", "block_out_channels"), f"norm_num_groups {m.norm_num_groups} "
                       f"does not divide every block_out_channels {m.block_out_channels}")
    elif m.backbone == "dit" and m.image_size % m.dit_patch:
        raise fail(("image_size", "dit_patch"), f"image_size {m.image_size} is not divisible by "
                   f"dit_patch {m.dit_patch}")


# ---------------------------------------------------------------- grid, variants, search
FIXED_FIELDS = {"name": "name", "seed": "seeds", "output_dir": "output_dir", "variant": "variants",
                "strategy.name": "strategies or variants",
                # the shards are packed (or their URLs resolved) once per sweep, before any trial
                **{f"data.{k}": f"data.{k} (one dataset per sweep)"
                   for k in ("source", "image_size", "count", "shard_size", "split", "root", "urls",
                             "shapes_per_image", "masks")}}


def _sweep_path(path: str, strategy: str) -> list[str]:
    """Where a dotted TrialConfig path lives in the sweep file, for one strategy's trials."""
    parts = path.split(".")
    trial_fields = {f.name for f in dataclasses.fields(TrialConfig)}
    if path in FIXED_FIELDS or parts[0] in FIXED_FIELDS:
        raise ValueError(f"cannot be overridden; set {FIXED_FIELDS.get(path, FIXED_FIELDS.get(parts[0]))} instead")
    if parts[0] not in trial_fields:
        raise ValueError(f"unknown field {parts[0]!r}; known: {sorted(trial_fields - set(FIXED_FIELDS))}")
    if parts[0] == "strategy":
        if parts[1:] == ["granularity"]:
            return ["granularity"]
        if len(parts) == 3 and parts[1] == "options":
            return ["strategy_options", strategy, parts[2]]
        raise ValueError("only strategy.granularity and strategy.options.<option> can be overridden")
    return parts


def _plain(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep as a plain mapping without its grid, variants and search (re-validatable)."""
    raw = asdict(cfg)
    for key in ("grid", "variants", "search", "preregistration", "source_file"):
        raw.pop(key)
    return raw


def check_override(cfg: SweepConfig, overrides: dict[str, Any], strategy: str, label: str, where: str) -> None:
    """Validate ``overrides`` ({dotted path: value}) for ``strategy``'s trials as if written into the
    sweep file together: each path must exist, each value type-check, and the whole pass every
    field and cross-field check."""
    raw = {**_plain(cfg), "strategies": [strategy]}  # the arm's own strategy, not every arm's
    for path, value in overrides.items():
        try:
            keys = _sweep_path(path, strategy)
        except ValueError as e:
            raise ConfigError(f"{where}: {label}: {e}") from None
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {label}: {key!r} is a value, not a section")
        node[keys[-1]] = value
    try:
        from_dict(raw, where)
    except ConfigError as e:
        what = (f"{next(iter(overrides.values()))!r} is" if len(overrides) == 1 else
                ", ".join(f"{p}={v!r}" for p, v in overrides.items()) + " together are")
        raise ConfigError(f"{where}: {label}: {what} not valid here: "
                          f"{str(e).removeprefix(f'{where}: ')}") from None


def _strategy_of(cfg: SweepConfig, label: str) -> str:
    return cfg.variants[label].strategy if label in cfg.variants else label


def _check_grid(cfg: SweepConfig, where: str) -> None:
    for path, values in cfg.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{path}: expected a non-empty list of values, got {values!r}")
        for value in values:
            for strategy in dict.fromkeys(_strategy_of(cfg, lab) for lab in cfg.labels()):
                check_override(cfg, {path: value}, strategy, f"grid.{path}", where)


def _check_variants(cfg: SweepConfig, where: str) -> None:
    known = _known_strategies()
    for name, v in cfg.variants.items():
        at = f"variants.{name}"
        if name in known or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: {at}: a variant needs its own name (letters, digits, '-', "
                              f"'_'), not a strategy's ({sorted(known)})")
        if v.strategy not in known:
            raise ConfigError(f"{where}: {at}.strategy: unknown strategy {v.strategy!r}; known: {sorted(known)}")
        for path, value in v.overrides.items():
            if path in cfg.grid:
                raise ConfigError(f"{where}: {at}.overrides.{path}: also in grid; a path is set in one place")
            check_override(cfg, {path: value}, v.strategy, f"{at}.overrides.{path}", where)


def _check_combinations(cfg: SweepConfig, where: str) -> None:
    """Each trial's overrides together (its variant's and its grid point's), where it has several:
    each value was checked alone above, e.g. train.batch_size and resources.workers on two axes."""
    for label in cfg.labels():
        v = cfg.variants.get(label)
        for point in cfg.grid_points():
            overrides = {**(v.overrides if v else {}), **point}
            if len(overrides) > 1:
                check_override(cfg, overrides, _strategy_of(cfg, label), f"arm {label}", where)


def _check_search(cfg: SweepConfig, where: str) -> None:
    s = cfg.search
    if s is None:
        return
    if cfg.grid or cfg.variants:
        raise ConfigError(f"{where}: search: cannot be combined with grid or variants")
    if len(cfg.strategies) != 1:
        raise ConfigError(f"{where}: strategies: a search runs one strategy; got {list(cfg.strategies)}")
    _check_objectives(s, where)
    if not s.space:
        raise ConfigError(f"{where}: search.space: declare at least one dimension")
    for path, spec in s.space.items():
        for value in _space_values(spec, f"search.space.{path}", where):
            check_override(cfg, {path: value}, cfg.strategies[0], f"search.space.{path}", where)
    if s.scheduler and s.scheduler.grace_period >= cfg.train.steps:
        raise ConfigError(f"{where}: search.scheduler.grace_period: must be < train.steps = {cfg.train.steps}")


# a primary metric the held-out evaluation only produces with this perception task
PRIMARY_NEEDS_TASK = {"head_acc": "classify", "head_ece": "classify", "miou": "segment",
                      "pixel_acc": "segment"}


def _check_preregistration(cfg: SweepConfig, where: str) -> None:
    """The arms exist, every primary metric is a registered held-out metric every arm produces and
    has a margin > 0, and the sweep runs at least the pre-registered number of paired seeds."""
    from harness.metrics import held_out

    p, at = cfg.preregistration, "preregistration"
    if p is None:
        return
    if cfg.search or cfg.grid:
        raise ConfigError(f"{where}: {at}: pairs fixed arms on seeds; a search or a grid crosses an "
                          "arm with several configurations (use variants)")
    arms = cfg.labels()
    named = (("baseline", p.baseline), *((f"comparisons[{i}]", a) for i, a in enumerate(p.comparisons)))
    for field_, name in named:
        if name not in arms:
            raise ConfigError(f"{where}: {at}.{field_}: {name!r} is no arm of this sweep; arms: {list(arms)}")
    if p.baseline in p.comparisons or len(set(p.comparisons)) != len(p.comparisons):
        raise ConfigError(f"{where}: {at}.comparisons: distinct arms other than the baseline {p.baseline!r}")
    tasks = {a: cfg.arm(a, cfg.seeds[0]).method.perception.tasks for a in arms}
    for i, m in enumerate(p.primary):
        if m not in held_out() and m != "pixel_acc":
            raise ConfigError(f"{where}: {at}.primary[{i}]: {m!r} is not a held-out metric of the "
                              f"registry (harness.metrics); known: {sorted({*held_out(), 'pixel_acc'})}")
        need = PRIMARY_NEEDS_TASK.get(m)
        lacking = [a for a in (p.baseline, *(p.comparisons or arms)) if need and need not in tasks[a]]
        if lacking:
            raise ConfigError(f"{where}: {at}.primary[{i}]: {m} needs the {need} task "
                              f"(method.perception.tasks), which arm {lacking[0]!r} does not train")
    for m in p.primary:
        margin = p.margins.get(m)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
            raise ConfigError(f"{where}: {at}.margins.{m}: every primary metric needs an equivalence "
                              f"margin > 0 in the metric's units, got {margin!r}")
    for m in p.margins:
        if m not in p.primary:
            raise ConfigError(f"{where}: {at}.margins.{m}: not a primary metric ({list(p.primary)})")
    if len(cfg.seeds) < p.seeds:
        raise ConfigError(f"{where}: seeds: {len(cfg.seeds)} listed, fewer than the {p.seeds} paired "
                          f"seeds registered in {at}.seeds")
    _check_ablation(p, arms, where)


def _check_ablation(p: PreregistrationConfig, arms: tuple[str, ...], where: str) -> None:
    """The paper-shaped rows: existing arms, distinct row names, ``vs`` another row, and each
    paper direction (up|down) on a registered metric with a direction, for a known row."""
    from harness.metrics import direction

    at, rows = "preregistration.ablation", [r.row for r in p.ablation]
    if len(set(rows)) != len(rows):
        raise ConfigError(f"{where}: {at}: row names must be distinct, got {rows}")
    for i, r in enumerate(p.ablation):
        if r.arm not in arms:
            raise ConfigError(f"{where}: {at}[{i}].arm: {r.arm!r} is no arm of this sweep; "
                              f"arms: {list(arms)}")
        if r.vs is not None and (r.vs not in rows or r.vs == r.row):
            raise ConfigError(f"{where}: {at}[{i}].vs: {r.vs!r} is not another row of the table")
    for row, dirs in p.paper_direction.items():
        here = f"preregistration.paper_direction.{row}"
        if row not in rows:
            raise ConfigError(f"{where}: {here}: no ablation row of that name; rows: {rows}")
        if not isinstance(dirs, dict):
            raise ConfigError(f"{where}: {here}: expected a mapping metric -> up|down, got {dirs!r}")
        for m, d in dirs.items():
            if direction(m) is None:
                raise ConfigError(f"{where}: {here}.{m}: not a registered metric with a direction")
            if d not in ("up", "down"):
                raise ConfigError(f"{where}: {here}.{m}: must be up or down, got {d!r}")


def preregistration_from_dict(raw: dict[str, Any], where: str = "<results>") -> PreregistrationConfig:
    """The typed section back from a result row's config JSON (fields and ranges; the arms were
    checked against the sweep when it was loaded)."""
    return _build(PreregistrationConfig, raw, "preregistration", where)


def _check_objectives(s: SearchConfig, where: str) -> None:
    if s.metrics and (s.metric or s.mode):
        raise ConfigError(f"{where}: search: give metric/mode (one objective) or metrics/modes, not both")
    if s.modes and len(s.modes) != len(s.metrics):
        raise ConfigError(f"{where}: search.modes: {len(s.modes)} modes for {len(s.metrics)} metrics")
    if len(set(s.metrics)) != len(s.metrics):
        raise ConfigError(f"{where}: search.metrics: listed twice in {list(s.metrics)}")
    for i, m in enumerate(s.metrics or (s.metric or "head_acc",)):
        if m not in objectives():
            at = f"search.metrics[{i}]" if s.metrics else "search.metric"
            raise ConfigError(f"{where}: {at}: unknown objective {m!r}; known: {sorted(objectives())}")


def _space_values(spec: ParamSpec, at: str, where: str) -> list[Any]:
    """The values that bound a dimension (both ends, or every choice), after checking its shape."""
    if spec.type == "categorical":
        if not spec.choices or spec.low is not None or spec.high is not None or spec.log:
            raise ConfigError(f"{where}: {at}: categorical takes a non-empty choices list only")
        return list(spec.choices)
    if spec.low is None or spec.high is None or spec.choices is not None or not spec.low < spec.high:
        raise ConfigError(f"{where}: {at}: {spec.type} takes low < high (and no choices)")
    if spec.log and spec.low <= 0:
        raise ConfigError(f"{where}: {at}: a log scale needs low > 0")
    if spec.type == "int":
        if not (spec.low.is_integer() and spec.high.is_integer()):
            raise ConfigError(f"{where}: {at}: int bounds must be whole numbers")
        return [int(spec.low), int(spec.high)]
    return [spec.low, spec.high]


# ---------------------------------------------------------------- dict → dataclass
def _convert(tp: Any, value: Any, path: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    fail = lambda msg: ConfigError(f"{where}: {path}: {msg}")  # noqa: E731
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # X | None: keep X's own, more precise error
            return _convert(real[0], value, path, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, where)
            except ConfigError:
                continue
        raise fail(f"expected {tp}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail(f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value))
        if len(args) != len(value):
            raise fail(f"expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]", where) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(f"expected a mapping, got {value!r}")
        item = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        if dataclasses.is_dataclass(item):  # e.g. variants: name -> VariantConfig
            return {k: _build(item, v, f"{path}.{k}", where) for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail(f"expected a string, got {value!r}")
        return value
    raise fail(f"unsupported type {tp}")  # pragma: no cover


def _build(cls: type, raw: Any, path: str, where: str) -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {path or '<top>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names or key == "source_file":
            raise ConfigError(f"{where}: {prefix}{key}: unknown field; known: {sorted(names - {'source_file'})}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}", where) for k, v in raw.items()}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            raise ConfigError(f"{where}: {prefix}{f.name}: required field is missing")
    for key, (ok, msg) in CHECKS.get(cls, {}).items():
        if key in kwargs and not ok(kwargs[key]):
            raise ConfigError(f"{where}: {prefix}{key}: {msg}, got {kwargs[key]!r}")
    return cls(**kwargs)


def from_dict(raw: dict[str, Any], where: str = "<dict>") -> SweepConfig:
    """A validated :class:`SweepConfig` from a plain mapping (the parsed YAML)."""
    cfg = _build(SweepConfig, raw, "", where)
    cfg = dataclasses.replace(cfg, source_file=where)
    _cross_checks(cfg, where)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: plain YAML keeps the last
    one silently, so ``train: {steps: 4}`` further down a file would quietly win."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: construct_mapping itself reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file (safe YAML loader only)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    return from_dict(raw if raw is not None else {}, str(path))


def trial_from_dict(raw: dict[str, Any]) -> TrialConfig:
    """Rebuild a :class:`TrialConfig` from :meth:`TrialConfig.to_dict` (it crosses Ray as a dict).

    Field types and ranges only, in pure Python: the sweep-level checks (strategies, options, the
    model, combinations) ran once, at the driver, and importing genrep here would cost every Tune
    trainable a torch import."""
    return _build(TrialConfig, raw, "", "<trial>")
