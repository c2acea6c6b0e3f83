"""Every rule that spans several fields of a sweep, in one place.

:func:`cross_checks` runs once a sweep's fields each have their type and range
(:func:`harness.config.convert.build`): the strategies and their options, the model's preset and
overrides, the sections that must agree (dense perception, the two stages, the evaluation split),
and every override of the ``grid:``, ``variants:`` and ``search:`` sections, each validated as if
written into the file (:func:`check_override`), and the pre-registration against the arms
(:mod:`harness.config.registration`).
harness.modes and genrep are imported inside the checks that need them: they import torch, which
a trial rebuilding its config (``trial_from_dict``) must not pay.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from harness.config.convert import ConfigError, build, check, convert, violation
from harness.config.registration import check_preregistration
from harness.config.schema import POSITIVE, ModelSection, TrialConfig, known_strategies
from harness.config.sweep_schema import ParamSpec, SearchConfig, SweepConfig
from harness.metrics import objectives

# ZeRO-3 is refused here, before Ray starts, with the reason harness.engine gives
ZERO3 = ("deepspeed.zero_stage: 3 is not supported: ZeRO-3 partitions the parameters outside the "
         "engine's forward, and the per-task gradients are taken through engine.module; use stage "
         "0, 1 or 2")


def _check_init(cfg: SweepConfig, where: str) -> None:
    """One warm start: a pretraining run or a saved directory, not both; a directory that
    ``save_pretrained`` wrote (its architecture is checked against the model when it is loaded,
    at the driver: harness.init)."""
    init = cfg.init
    if init.pretrain is not None and init.path is not None:
        raise ConfigError(f"{where}: init: give pretrain (a run made and cached here) or path (a saved "
                          "backbone), not both")
    if init.path is not None and not (Path(init.path).expanduser() / "config.json").is_file():
        raise ConfigError(f"{where}: init.path: {init.path!r} is no save_pretrained directory "
                          "(no config.json in it)")
    if init.pretrain is not None and init.pretrain.loss == "joint" and not cfg.method.use_ce \
            and "segment" not in cfg.method.perception.tasks:
        raise ConfigError(f"{where}: init.pretrain.loss: joint trains the perception loss, and "
                          "method.use_ce is false with no segment task: it would have none")


def cross_checks(cfg: SweepConfig, where: str) -> None:
    """The rules that span several fields; ``where`` (the file) starts every error."""
    known = known_strategies()
    for s in cfg.strategies:
        if s not in known:
            raise ConfigError(f"{where}: strategies: unknown strategy {s!r}; known: {sorted(known)}")
    if not cfg.labels():
        raise ConfigError(f"{where}: strategies: empty and no variants: the sweep has no arm")
    _check_scope(cfg, _check_model(cfg.model, where), where)
    _check_init(cfg, where)
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
    if mc.chain == "tied" and mc.eta == 0:
        raise ConfigError(f"{where}: method.mc.chain: tied needs method.mc.eta > 0 (1 by default), "
                          "got eta 0: the tied chain keeps ε* fixed at eta 0, so every kept state "
                          "would carry the same noise")
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
    check_preregistration(cfg, where)


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
# the ranges of genrep.model.ModelConfig's fields (genrep declares no harness metadata)
MODEL_CHECKS = {
    **dict.fromkeys(("image_size", "channels", "num_classes", "layers_per_block", "norm_num_groups",
                     "dit_depth", "dit_heads", "dit_head_dim", "dit_patch", "head_hidden", "sem_hidden",
                     "sem_width", "attention_levels"), POSITIVE),
    "block_out_channels": check(lambda v: len(v) > 0 and min(v) > 0, "must be a non-empty list of integers > 0"),
    "head": check(lambda v: v in ("linear", "mlp"), "must be linear or mlp"),
    "t_perception": check(lambda v: 0 <= v < TIMESTEPS, f"must be in [0, {TIMESTEPS})"),
}


def _check_model(model: ModelSection, where: str):
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
        over[key] = convert(hints[key], value, at, where)
        msg = violation(MODEL_CHECKS.get(key, {}), over[key])
        if msg:
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
        if m.attention_levels > 1 and not m.attention:
            raise fail(("attention_levels",), "attention_levels > 1 needs attention: true")
        if m.attention_levels > len(m.block_out_channels):
            raise fail(("attention_levels", "block_out_channels"), f"attention_levels {m.attention_levels} "
                       f"exceeds the UNet's {len(m.block_out_channels)} levels")
    elif m.backbone == "dit" and m.image_size % m.dit_patch:
        raise fail(("image_size", "dit_patch"), f"image_size {m.image_size} is not divisible by "
                   f"dit_patch {m.dit_patch}")
    return m


def _check_scope(cfg: SweepConfig, model, where: str) -> None:
    """``scope: attention`` needs attention tensors among the shared parameters (genrep.model
    ``attention_size``: diffusers Attention modules). It is checked for every arm: for `sum` and
    `separate` (no task gradients) the scope changes nothing, but the sweep would claim it."""
    from genrep.model import attention_size

    if cfg.scope == "attention" and attention_size(model)[0] == 0:
        raise ConfigError(f"{where}: scope: attention, but model.preset {cfg.model.preset!r} with its "
                          "overrides has no attention tensors (diffusers Attention modules) among its "
                          "shared parameters; use scope: all, or a model with attention")


# ---------------------------------------------------------------- grid, variants, search
FIXED_FIELDS = {"name": "name", "seed": "seeds", "output_dir": "output_dir", "variant": "variants",
                "strategy.name": "strategies or variants",
                # the shards are packed (or their URLs resolved) once per sweep, before any trial
                **{f"data.{k}": f"data.{k} (one dataset per sweep)"
                   for k in ("source", "image_size", "count", "shard_size", "split", "root", "urls",
                             "shapes_per_image", "masks")},
                # the warm start is trained (or loaded) once per sweep, before any trial
                "init": "init (one warm start per sweep)"}


def _sweep_path(path: str, strategy: str) -> list[str]:
    """Where a dotted TrialConfig path lives in the sweep file, for one strategy's trials."""
    parts = path.split(".")
    trial_fields = {f.name for f in dataclasses.fields(TrialConfig)}
    if path in FIXED_FIELDS or parts[0] in FIXED_FIELDS:
        raise ValueError(f"cannot be overridden; set {FIXED_FIELDS.get(path, FIXED_FIELDS.get(parts[0]))} instead")
    if parts[0] not in trial_fields:
        raise ValueError(f"unknown field {parts[0]!r}; known: {sorted(trial_fields - set(FIXED_FIELDS))}")
    if parts[0] == "strategy":
        if parts[1:] in (["granularity"], ["scope"]):
            return parts[1:]
        if len(parts) == 3 and parts[1] == "options":
            return ["strategy_options", strategy, parts[2]]
        raise ValueError("only strategy.granularity, strategy.scope and strategy.options.<option> "
                         "can be overridden")
    return parts


def check_override(cfg: SweepConfig, overrides: dict[str, Any], strategy: str, label: str, where: str) -> None:
    """Validate ``overrides`` ({dotted path: value}) for ``strategy``'s trials as if written into the
    sweep file together: each path must exist, each value type-check, and the whole pass every
    field and cross-field check."""
    raw = {**cfg.plain(), "strategies": [strategy]}  # the arm's own strategy, not every arm's
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
        cross_checks(build(SweepConfig, raw, "", where), where)
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
    known = known_strategies()
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


