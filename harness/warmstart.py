"""The warm start of a sweep (``init:``): one backbone that every arm and seed fine-tunes from.

``init.pretrain`` runs once, at the driver, before any trial: a Ray Train job like any trial (the
sweep's model, data with its labelled fraction, evaluation and resources; strategy ``sum`` with
the perception loss at weight 0 for ``loss: generation``; no teacher, no semantic module, no stage
1), whose worker saves the trained backbone with diffusers' ``save_pretrained``. It is cached
beside the packed shards under ``init/pretrain-<key>``, keyed by the hash of its resolved config
and of the data's manifest, the way shards are cached: written to a temporary directory and
renamed when complete (a killed pretrain leaves no cache, only a ``.tmp-`` directory that the
next start removes; its Ray Train run resumes from its last checkpoint), and verified (a digest
of every file) when reused. ``init.path`` is a user's ``save_pretrained`` directory instead.

The driver hands each trial the directory (``init_dir``); each worker loads it into every network
before its DeepSpeed engine is built (harness.step.Network), and the heads keep the initialisation
of the trial's own seed. The sweep writes ``init.json`` (hash, steps, the warm start's zero-shot
top-1) beside its results, and the report names it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from genrep.model import build_model
from genrep.pretrained import ArchitectureMismatch, load_backbone, weights_digest
from harness import atomic
from harness.config import ConfigError, InitConfig, SweepConfig, TrialConfig, apply_overrides
from harness.data import Dataset, data_root

log = logging.getLogger("harness")
META = "init.json"


def pretrain_trial(sweep: SweepConfig) -> TrialConfig:
    """The warm start's own run as a trial: the sweep's first arm's sections, trained
    ``init.pretrain.steps`` from its seed on L_gen alone (or L_perc + L_gen for ``loss: joint``)."""
    p = sweep.init.pretrain
    base = sweep.trial("sum", p.seed)
    weights = [0.0, 1.0] if p.loss == "generation" else [1.0, 1.0]
    # train.checkpoint_every stays the sweep's: a killed pretrain resumes from its last checkpoint
    overrides = {"train.steps": p.steps, "train.stage1_steps": 0,
                 "train.log_every": min(base.train.log_every, p.steps), "eval.every": 0,
                 "method.beta_kd": 0.0, "method.use_ce": True, "method.semantic.enabled": False,
                 "method.semantic.rep_align": 0.0, "strategy.options.task_weights": weights,
                 **({"train.lr": p.lr} if p.lr is not None else {}),
                 **({"train.batch_size": p.batch_size} if p.batch_size is not None else {})}
    trial = dataclasses.replace(base, strategy=dataclasses.replace(base.strategy, options={}),
                                variant="pretrain", init=InitConfig())
    return apply_overrides(trial, overrides)


def cache_key(trial: TrialConfig, data: Dataset) -> str:
    """12 hex digits of sha256(the pretrain's resolved config, less the sweep's name and output
    directory, and the data's key): the same run on the same data in any sweep shares the cache."""
    cfg = {k: v for k, v in trial.to_dict().items() if k not in ("name", "output_dir")}
    blob = json.dumps([cfg, data.key], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def resolve_init(sweep: SweepConfig, data: Dataset, storage: str) -> dict[str, Any] | None:
    """The warm start's directory and description (None without ``init``): made now for
    ``init.pretrain`` unless cached, verified when reused; ``init.path`` checked against the
    model's architecture. Errors name the field."""
    if sweep.init.path is not None:
        return from_path(sweep)
    if sweep.init.pretrain is None:
        return None
    trial = pretrain_trial(sweep)
    key = cache_key(trial, data)
    root = data_root(sweep) / "init"
    final = root / f"pretrain-{key}"
    if (final / META).exists():
        return verified(final, sweep)
    for stale in root.glob(f".tmp-pretrain-{key}-*"):  # a killed pretrain's leftovers
        shutil.rmtree(stale, ignore_errors=True)
    return made(trial, sweep.init.pretrain.loss, key, data, storage, final)


def from_path(sweep: SweepConfig) -> dict[str, Any]:
    path = Path(sweep.init.path).expanduser().resolve()
    try:
        load_backbone(build_model(sweep.trial(sweep.strategies[0], sweep.seeds[0]).model_config()), path)
    except ArchitectureMismatch as e:
        raise ConfigError(f"{sweep.source_file}: init.path: {e}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{sweep.source_file}: init.path: {path} could not be loaded: {e}") from None
    return {"dir": str(path), "source": "path", "digest": weights_digest(path)}


def verified(final: Path, sweep: SweepConfig) -> dict[str, Any]:
    """A cached warm start, its files checked against the digest recorded when it was made."""
    meta = json.loads((final / META).read_text())
    if weights_digest(final / "backbone") != meta["digest"]:
        raise ConfigError(f"{sweep.source_file}: init.pretrain: the cached backbone {final} does not "
                          "match its recorded digest (a changed or damaged file): delete that directory "
                          "to train it again")
    log.warning("warm start: reusing %s (%d steps, zero-shot top-1 %.3f)", final, meta["steps"],
                meta.get("mc_acc", float("nan")))
    return {**meta, "dir": str(final / "backbone")}


def made(trial: TrialConfig, loss: str, key: str, data: Dataset, storage: str, final: Path) -> dict[str, Any]:
    """Run the pretrain as a Ray Train job into a temporary directory, then rename it into place."""
    from harness.trial import fit

    tmp = final.parent / f".tmp-pretrain-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    log.warning("warm start: pretraining %d steps (cache %s)", trial.train.steps, final)
    res = fit(trial, data.plain(), storage, f"pretrain-{key}", in_tune=False, save_to=str(tmp))
    if res.error is not None or not (tmp / "backbone" / "config.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"init.pretrain: the warm start's run failed: {res.error}")
    final_row = getattr(res, "return_value", None) or {}
    meta = {"key": key, "source": "pretrain", "steps": trial.train.steps, "seed": trial.seed,
            "loss": loss,
            "digest": weights_digest(tmp / "backbone"),
            **{m: float(final_row[m]) for m in ("mc_acc", "mc_acc_stderr", "heldout_loss", "head_acc")
               if m in final_row}}
    atomic.write_text(tmp / META, json.dumps(meta, indent=1, sort_keys=True))
    try:
        tmp.rename(final)
    except OSError:  # another driver finished the same pretrain first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return {**json.loads((final / META).read_text()), "dir": str(final / "backbone")}


def record(init: dict[str, Any] | None, output_dir: str | Path) -> None:
    """``init.json`` beside the sweep's results (the report names the warm start), or none."""
    path = Path(output_dir) / META
    if init is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(init, indent=1, sort_keys=True))
