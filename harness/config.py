"""The typed config tree: a sweep file, validated at construction.

YAML lives only in ``sweeps/``; it is read with ``yaml.safe_load`` and turned into frozen
dataclasses by :func:`from_dict`, which rejects unknown keys, wrong types and out-of-range values
with an error naming the file and the field path (``sweeps/x.yaml: train.steps: must be > 0``).
One trial is a :class:`TrialConfig`: the sweep's template with one strategy and one seed (and any
grid or search values) filled in. Every result row stores the resolved trial config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


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
    urls: str | None = None  # a shard url pattern (brace notation, file://, pipe:) overriding root
    shuffle_buffer: int = 256
    num_workers: int = 0  # DataLoader workers per Ray Train worker
    on_bad_sample: Literal["raise", "skip"] = "raise"


@dataclass(frozen=True)
class ModelSection:
    preset: str = "digits16"
    overrides: dict[str, Any] = field(default_factory=dict)  # any genrep.model.ModelConfig field


@dataclass(frozen=True)
class McConfig:
    k: int = 8  # Monte Carlo draws (t, ε) per image, shared by all classes
    tau: float = 1.0  # temperature of the Bayes posterior softmax(−e_c/τ)
    every: int = 1  # run the teacher every N steps (in between: no distillation term)
    subset: float = 1.0  # fraction of the batch the teacher scores
    chunk_size: int = 2048  # network inputs per batched teacher forward (bounds peak memory)
    prune_k: int | None = None  # adaptive pruning: first-round draws over all classes ...
    prune_keep: int | None = None  # ... then the rest only for the best this many classes
    teacher: Literal["online", "ema"] = "online"


@dataclass(frozen=True)
class MethodConfig:
    p_uncond: float = 0.1  # label dropout: the null class with this probability
    use_ce: bool = True
    beta_kd: float = 1.0  # weight of the distillation loss; 0 switches the teacher off
    tau_kd: float = 1.0
    ema_decay: float = 0.999
    mc: McConfig = field(default_factory=McConfig)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "sum"
    granularity: Literal["vector", "tensor"] = "vector"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. damping, rule, one_sided


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


@dataclass(frozen=True)
class EvalConfig:
    split: str = "val"  # held-out split scored at the end of a trial
    mc_k: int = 8  # draws of the zero-shot diffusion classifier
    mc_images: int = 64  # held-out images it scores (B·K·C network evaluations)
    samples_per_class: int = 10  # class-conditional DDIM samples for fd_ref and sample_acc
    ddim_steps: int = 20
    guidance_scale: float = 1.0  # classifier-free guidance through the null class


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 0
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """Stable 12-hex-digit id of the resolved config (same config → same hash)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def model_config(self):
        from genrep.model import preset

        return preset(self.model.preset, **self.model.overrides)


@dataclass(frozen=True)
class SweepConfig:
    name: str
    output_dir: str = "results"
    strategies: tuple[str, ...] = ("sum", "pcgrad", "genrep", "separate")
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
    source_file: str = "<dict>"

    def trial(self, strategy: str, seed: int) -> TrialConfig:
        return TrialConfig(
            name=self.name, seed=seed,
            strategy=StrategyConfig(strategy, self.granularity, dict(self.strategy_options.get(strategy, {}))),
            data=self.data, model=self.model, method=self.method, train=self.train,
            eval=self.eval, deepspeed=self.deepspeed, resources=self.resources,
            output_dir=self.output_dir)

    def trials(self) -> list[TrialConfig]:
        return [self.trial(s, seed) for s in self.strategies for seed in self.seeds]


# ---------------------------------------------------------------- checks
def _positive(*names):
    return {n: (lambda v: v is None or v > 0, "must be > 0") for n in names}


# Where the harness writes: no '..' segment, so a sweep file cannot aim its output (results,
# checkpoints, packed data, `--overwrite`'s rmtree) above the directory it names.
NO_PARENT = (lambda v: v is None or ".." not in Path(v).parts, "must not contain a '..' segment")


CHECKS: dict[type, dict[str, tuple[Any, str]]] = {
    DataConfig: {**_positive("image_size", "count", "shard_size", "shuffle_buffer"),
                 "root": NO_PARENT,
                 "num_workers": (lambda v: v >= 0, "must be >= 0"),
                 "split": (lambda v: abs(sum(v) - 1) < 1e-6 and min(v) >= 0,
                           "three fractions >= 0 that sum to 1")},
    McConfig: {**_positive("k", "tau", "every", "chunk_size", "prune_k", "prune_keep"),
               "subset": (lambda v: 0 < v <= 1, "must be in (0, 1]")},
    MethodConfig: {"p_uncond": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
                   "beta_kd": (lambda v: v >= 0, "must be >= 0"),
                   **_positive("tau_kd"),
                   "ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)")},
    TrainConfig: {**_positive("steps", "batch_size", "lr", "log_every"),
                  "grad_clip": (lambda v: v >= 0, "must be >= 0"),
                  "warmup_steps": (lambda v: v >= 0, "must be >= 0"),
                  "checkpoint_every": (lambda v: v >= 0, "must be >= 0")},
    EvalConfig: {**_positive("mc_k", "mc_images", "samples_per_class", "ddim_steps"),
                 "guidance_scale": (lambda v: v >= 0, "must be >= 0"),
                 "split": (lambda v: v in ("val", "test"), "val or test")},
    DeepSpeedConfig: {"zero_stage": (lambda v: v in (0, 1, 2, 3), "must be 0, 1, 2 or 3")},
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


def _cross_checks(cfg: SweepConfig, where: str) -> None:
    """Checks that span several fields, in one place."""
    from genrep import strategies
    from genrep.model import PRESETS, ModelConfig

    known = set(strategies.available()) | {"separate"}
    for s in cfg.strategies:
        if s not in known:
            raise ConfigError(f"{where}: strategies: unknown strategy {s!r}; known: {sorted(known)}")
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"{where}: model.preset: unknown {cfg.model.preset!r}; known: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in cfg.model.overrides:
        if key not in fields:
            raise ConfigError(f"{where}: model.overrides.{key}: unknown field; known: {sorted(fields)}")
    if cfg.train.batch_size % cfg.resources.workers:
        raise ConfigError(f"{where}: train.batch_size: {cfg.train.batch_size} is not divisible by "
                          f"resources.workers = {cfg.resources.workers}")
    mc = cfg.method.mc
    if (mc.prune_k is None) != (mc.prune_keep is None):
        raise ConfigError(f"{where}: method.mc: prune_k and prune_keep go together")
    if mc.prune_k is not None and mc.prune_k >= mc.k:
        raise ConfigError(f"{where}: method.mc.prune_k: must be < method.mc.k = {mc.k}")
    if not cfg.method.use_ce and cfg.method.beta_kd == 0:
        raise ConfigError(f"{where}: method: use_ce is false and beta_kd is 0: no perception loss")
    for s, opts in cfg.strategy_options.items():
        if s not in strategies.available():
            raise ConfigError(f"{where}: strategy_options.{s}: not a strategy with options; "
                              f"known: {strategies.available()}")
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: strategy_options.{s}: expected a mapping, got {opts!r}")
        try:
            strategies.get(s).check_options(opts)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: strategy_options.{s}: {e}") from None


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


def load(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file (safe YAML loader only)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    return from_dict(raw if raw is not None else {}, str(path))


def trial_from_dict(raw: dict[str, Any]) -> TrialConfig:
    """Rebuild a :class:`TrialConfig` from :meth:`TrialConfig.to_dict` (it crosses Ray as a dict)."""
    return _build(TrialConfig, raw, "", "<trial>")
