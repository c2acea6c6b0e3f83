"""The typed config tree of one trial: frozen dataclasses, each field's range declared beside it
(what a sweep adds around it — variants, search, pre-registration, SweepConfig — is in
:mod:`harness.config.sweep_schema`).

A field is declared and range-checked in one place: ``k: int = field(default=8, metadata=POSITIVE)``
(:func:`~harness.config.convert.check` builds the metadata, :func:`~harness.config.convert.build`
applies it to every value given in a file). Rules that span several fields are in
:mod:`harness.config.checks`. Comments say what a field means and its units; what the shipped
defaults cost is measured in docs/performance.md.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.config.convert import check


def at_least(low: float, note: str = "") -> dict[str, Any]:
    return check(lambda v: v >= low, f"must be >= {low}{note}")


POSITIVE = check(lambda v: v is None or v > 0, "must be > 0")  # None: an optional field unset
NON_NEGATIVE = at_least(0)
FRACTION = check(lambda v: 0 < v <= 1, "must be in (0, 1]")
BELOW_ONE = check(lambda v: 0 <= v < 1, "must be in [0, 1)")
DISTINCT = check(lambda v: len(v) > 0 and len(set(v)) == len(v), "non-empty, distinct")
UNIQUE = check(lambda v: len(set(v)) == len(v), "distinct")
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
    # the positive control's known harm: this fraction of the labelled training images get
    # another class's label, chosen by a hash of each key and label_seed (the same images and
    # wrong labels in every epoch, worker split, arm and seed); held-out splits keep theirs
    label_noise: float = field(default=0.0, metadata=BELOW_ONE)


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
    # "reverse_chain": the states of one reverse chain per image as MCMC samples (GenRep's
    # estimator; docs/method.md): chain_steps steps, the first burn_in states dropped, then every
    # thin-th kept (the paper: 200, 50, 2); eta: the DDIM step's noise (1 = DDPM-like)
    estimator: Literal["forward", "reverse_chain"] = "forward"
    chain_steps: int = field(default=200, metadata=check(lambda v: 1 <= v <= 1000, "must be in [1, 1000]"))
    burn_in: int = field(default=50, metadata=NON_NEGATIVE)
    thin: int = field(default=2, metadata=at_least(1))
    eta: float = field(default=1.0, metadata=check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    # the chain's first timestep: None = T−1 (the paper's chain, from pure noise); a tied chain's
    # states are draws of q(x_t|x) wherever it starts, a free one forgets x from T−1
    chain_start: int | None = field(default=None, metadata=check(
        lambda v: v is None or 0 <= v <= 999, "must be null or in [0, 999]"))
    # "tied": the chain steps by the forward posterior q(x_s | x_t, x) (DDIM with x and its true
    # noise ε*; no network evaluations; needs eta > 0); "free": by the null-label network (the
    # first reading: from T−1 it forgets x and scores at chance, docs/performance.md, P3c)
    chain: Literal["tied", "free"] = "tied"
    # log p(x|y) from the kept states' d_j = ‖ε*_j − ε_θ(x_τj, τ_j, y)‖²: "noise_lme" the paper's
    # mean of densities in noise coordinates, LME_j(−d_j/2); "mean_log" the mean of the logs
    # (the Diffusion Classifier on the chain's t-grid); "x0_lme" the density of x in pixel space
    # (a hard max over states); formulas and measured top-1: docs/method.md
    aggregate: Literal["noise_lme", "mean_log", "x0_lme"] = "noise_lme"
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
    network whose perception feature map x_sem conditions the generation loss."""

    enabled: bool = False  # semantic-driven generation: a mean correction and a variance factor from x_sem
    # REPA weight of the representation-alignment term; > 0 switches it on
    rep_align: float = field(default=0.0, metadata=NON_NEGATIVE)
    # weight of the variational-bound term that trains the variance factor
    vlb_weight: float = field(default=1e-3, metadata=NON_NEGATIVE)
    # m of θ_sem ← m·θ_sem + (1−m)·θ, after every optimizer step of stage 2
    ema_decay: float = field(default=0.999, metadata=BELOW_ONE)
    # where x_sem comes from while sampling: the semantic net's feature map of the step's x̂_0, or of x_t
    inference: Literal["x0_hat", "x_t"] = "x0_hat"
    # where x_sem comes from in training: x̂_0 of the step's own (detached) ε, x_t, or the clean x_0
    # (the ablation: a function of the target, which sampling never has); null: as `inference`
    train_source: Literal["x0_hat", "x_t", "x0"] | None = None
    # the variance term's weighting over t: "per_t" divides KL_t by w_t = β_t/(α_t(1−ᾱ_{t−1})), so
    # every t pulls alike; "bound": the bound's own, where ~98% of the gradient is from t ≥ 990
    vlb_weighting: Literal["per_t", "bound"] = "per_t"

    @property
    def on(self) -> bool:
        """Does the trial need the semantic module and the semantic network?"""
        return self.enabled or self.rep_align > 0

    @property
    def train_from(self) -> str:
        """x_sem's source in training: ``train_source``, or ``inference`` when it is null."""
        return self.train_source or self.inference


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
    # the shared tensors the rule acts on: all, or those of the model's attention modules (the
    # paper's "attention blocks"; the rest take the task-weighted sum). A no-op for rules that
    # take no task gradients (sum). genrep/strategies/scope.py
    scope: Literal["all", "attention"] = "all"


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
    # the samplers scored, each on the same x_T: "ddim" (η = 0, ddim_steps; fd_ref, kid_ref,
    # sample_acc) and "ddpm" (η = 1, ddpm_steps: the paper's sampler, where the semantic σ factor
    # acts; fd_ref_ddpm, kid_ref_ddpm, sample_acc_ddpm). Guidance "auto" chooses with the first
    samplers: tuple[Literal["ddim", "ddpm"], ...] = field(default=("ddim",), metadata=DISTINCT)
    ddpm_steps: int = field(default=200, metadata=check(lambda v: 1 <= v <= 1000, "must be in [1, 1000]"))
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
    # robustness (the paper's noised-input test): head top-1 on x_t ~ q(x_t|x) at these t, one
    # fixed ε (harness.evaluate.robust_metrics): head_acc_t<t>; on our cosine schedule
    # σ = √(1−ᾱ_t) is 0.091 / 0.245 / 0.463 at t = 50 / 150 / 300; (): none. N·|t| head forwards
    robust_t: tuple[int, ...] = field(default=(50, 150, 300), metadata=check(
        lambda v: all(0 <= t <= 999 for t in v) and len(set(v)) == len(v), "distinct, each in [0, 999]"))


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
class PretrainConfig:
    """The warm start's own run (docs/sweeps.md, "Warm start"): the sweep's model, data (with its
    labelled fraction: an unlabelled image is conditioned on ∅ there too) and evaluation, trained
    ``steps`` steps from ``seed`` on ``loss``; every arm and seed then starts from its backbone."""

    steps: int = field(default=1000, metadata=POSITIVE)
    seed: int = 0
    # "generation": L_gen alone (the perception loss at weight 0); "joint": L_perc + L_gen, so the
    # backbone is shaped by the labels too. Heads are never carried over: each trial's are its seed's.
    loss: Literal["generation", "joint"] = "generation"
    lr: float | None = field(default=None, metadata=POSITIVE)  # None: train.lr
    batch_size: int | None = field(default=None, metadata=POSITIVE)  # None: train.batch_size


@dataclass(frozen=True)
class InitConfig:
    """Where every network's backbone starts: a pretraining run made once per sweep and cached
    beside the packed shards (``pretrain``), a diffusers ``save_pretrained`` directory (``path``),
    or neither (from scratch, each trial's seed)."""

    pretrain: PretrainConfig | None = None
    path: str | None = None  # a save_pretrained directory of the backbone's diffusers network

    @property
    def on(self) -> bool:
        return self.pretrain is not None or self.path is not None


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
    init: InitConfig = field(default_factory=InitConfig)  # the warm start (one per sweep)

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
