"""One trial: a Ray Tune function trainable that builds and fits a Ray Train ``TorchTrainer``.

This is the Ray Train V2 pattern: ``Tuner(TorchTrainer(...))`` is deprecated there; instead the
Tune function builds the trainer and ``TuneReportCallback`` forwards the workers'
``ray.train.report`` rows to Tune. The same function also runs a single trial without Tune
(``genrep-bench train``), where no callback is attached.

Configs are resolved once: the driver validates the sweep and hands every trial its arms'
resolved TrialConfigs (plain dicts, :func:`arm_configs`); a trial picks its arm, sets its seed and
applies its grid or search values field by field (:func:`resolve`), and its workers rebuild the
result with :func:`harness.config.trial_from_dict`. No trial re-reads the sweep file or re-runs
the sweep's validation.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from harness.config import SweepConfig, TrialConfig, apply_overrides, trial_from_dict


# This module stays free of torch, DeepSpeed, diffusers and webdataset at import time: the Tune
# trainable (run_trial) and the Train controller (which unpickles train_loop) import it in their
# own Ray worker processes, which need none of the worker's stack (they get torch through
# ray.train.torch anyway); importing it there cost the trainable ~1 CPU-second a trial (3.5 →
# 2.4 CPU-s: docs/performance.md, P5). Only the Train workers import harness.worker.
log = logging.getLogger("harness")


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's ``train_loop_per_worker``: :func:`harness.worker.train_loop`, imported here,
    in the Train worker that runs it."""
    from harness.worker import train_loop as run

    return run(config)


def scaling_config(cfg: TrialConfig):
    from ray.train import ScalingConfig

    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})
    return ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                         resources_per_worker=per_worker, placement_strategy=r.placement)


def torch_config(cfg: TrialConfig):
    from ray.train.torch import TorchConfig

    backend = cfg.deepspeed.backend
    if backend == "auto":
        backend = "nccl" if cfg.resources.gpus_per_worker else "gloo"
    return TorchConfig(backend=backend)


def worker_env() -> dict[str, str]:
    """Environment the Train workers need: the user's DeepSpeed and cache settings, the venv's
    ninja on PATH, quiet warnings. Each worker sets the rest itself before DeepSpeed is imported
    (``harness.engine.prepare_environment``: the JIT cache of its own venv, and the CPU
    accelerator only where *that* node has no CUDA device; decided here, in the Tune trainable,
    a CPU-only head node would have sent DS_ACCELERATOR=cpu to GPU workers)."""
    import sys

    keys = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "GENREP_VERBOSE", "GENREP_CACHE",
            "GENREP_FAULT_KILL_AT_STEP", "GENREP_FAULT_NAN_AT_STEP")  # test-only fault hooks
    env = {k: os.environ[k] for k in keys if k in os.environ}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning,ignore::FutureWarning"
    return env


def fit(cfg: TrialConfig, data: dict[str, Any], storage: str, name: str, in_tune: bool,
        trial_dir: str | None = None, init_dir: str | None = None, save_to: str | None = None):
    """Build and fit the TorchTrainer of one trial; returns Ray Train's Result. ``data``: the
    sweep's dataset (harness.data.resolve_dataset, resolved once at the driver) as
    ``Dataset.plain()``; ``trial_dir``: where the evaluations' sample grids go; ``init_dir``: the
    warm start's backbone (harness.warmstart); ``save_to``: where the warm start's own run saves
    its trained backbone."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"trial": cfg.to_dict(), "data": data, "trial_dir": trial_dir,
                           "init_dir": init_dir, "save_to": save_to},
        scaling_config=scaling_config(cfg), torch_config=torch_config(cfg),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            # Under Tune, Tune retries the whole trial (FailureConfig in harness.sweep), so a trial
            # is attempted 1 + max_failures times in all, not (1 + max_failures)²; every attempt
            # resumes from the run's latest checkpoint (same run name and storage: Ray Train V2
            # reloads its checkpoint manager's snapshot).
            failure_config=FailureConfig(max_failures=0 if in_tune else cfg.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env()}))
    return trainer.fit()


def trial_name(cfg: TrialConfig) -> str:
    return f"{cfg.variant}-seed{cfg.seed}-{cfg.hash()}"


def run_trial(params: dict[str, Any], arms: dict[str, dict], data: dict[str, Any], storage: str,
              init_dir: str | None = None) -> None:
    """The Tune function trainable: one arm × seed of the sweep (plus grid or searched values)."""
    import ray.tune

    cfg = resolve(arms, params)
    trial_dir = Path(ray.tune.get_context().get_trial_dir())
    start = time.perf_counter()
    log.warning("trial start: %s (strategy %s) seed=%d", cfg.variant, cfg.strategy.name, cfg.seed)
    fit(cfg, data, storage, f"train-{trial_name(cfg)}", in_tune=True, trial_dir=str(trial_dir),
        init_dir=init_dir)
    log.warning("trial end: %s seed=%d wall=%.1fs", cfg.variant, cfg.seed,
                time.perf_counter() - start)


def arm_configs(sweep: SweepConfig) -> dict[str, dict[str, Any]]:
    """Each arm's resolved TrialConfig as a plain dict (at seed 0, so its seed is the arm's seed
    offset, 0 but for an A/A control; without grid or search values): what the driver ships to
    every trial."""
    return {label: sweep.arm(label, 0).to_dict() for label in sweep.labels()}


def resolve(sweep: SweepConfig | dict[str, dict[str, Any]], params: dict[str, Any]) -> TrialConfig:
    """The trial config for Tune's ``params``: the arm (``variant``: a strategy or a named variant;
    ``strategy`` in experiments started before variants existed), the seed, and any dotted-path
    ``overrides`` from a grid or a search. ``sweep``: the validated sweep, or its
    :func:`arm_configs` (in a trial); both give the same config, :meth:`SweepConfig.arm`'s."""
    label = params.get("variant", params.get("strategy"))
    arm = sweep.arm(label, 0) if isinstance(sweep, SweepConfig) else trial_from_dict(sweep[label])
    seed = arm.seed + int(params["seed"])  # an arm at seed 0 carries its seed offset
    return apply_overrides(dataclasses.replace(arm, seed=seed), params.get("overrides") or {})
