"""The Ray Train worker: data shards → DeepSpeed engine(s) → per-step metrics and checkpoints.

``train_loop`` runs in every Ray Train worker process (one data-parallel rank). It reads top to
bottom: build the step (models, engines), restore a checkpoint if Ray Train hands one over, stream
this rank's slice of the shards, train, report every ``log_every`` steps, evaluate at the end (and
every ``eval.every`` steps from step 0, when set).
Only rank 0's reports reach Ray Tune; every rank calls ``ray.train.report`` the same number of
times, as Ray Train requires.
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from genrep.pretrained import save_backbone
from harness import parallel
from harness.config import TrialConfig, trial_from_dict
from harness.data import Dataset, forever, train_loader
from harness.evaluate_trial import evaluate_trial
from harness.faults import inject_faults
from harness.parallel import Shard
from harness.step import make_step
from harness.teacher import teacher_inputs

log = logging.getLogger(__name__)


class Window:
    """Running means of the metrics between two reports."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self.sums[k] += float(v)
            self.counts[k] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def state_dict(self) -> dict[str, dict]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self.sums.update(state["sums"])
        self.counts.update(state["counts"])


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's ``train_loop_per_worker``: ``config = {"trial": TrialConfig dict, "data":
    harness.data.Dataset as a dict, "trial_dir": where sample grids go (None: nowhere),
    "init_dir": the warm start's backbone (None: from scratch), "save_to": where the trained
    backbone goes (the warm start's own run; None: nowhere)}``.

    Returns the final (held-out) report: Ray Train V2 keeps in ``Result.metrics_dataframe`` only
    reports that came with a kept checkpoint, so ``genrep-bench train`` reads the final one here.
    """
    import ray.train

    t_enter = time.perf_counter()
    cfg: TrialConfig = trial_from_dict(config["trial"])
    dataset = Dataset(**config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device() if cfg.resources.gpus_per_worker else torch.device("cpu")
    shard = Shard(rank, world, cfg.train.batch_size // world)
    step_fn = make_step(cfg, shard, device, **teacher_inputs(cfg, dataset, device),
                        init_dir=config.get("init_dir"))
    loader = train_loader(cfg, dataset, shard.local, rank, world)
    trial_dir = config.get("trial_dir")  # where the evaluations' sample grids go
    # timed: the whole run's means (the final report's step_time and mc_evals; every report's
    # images_per_s), checkpointed so that a resumed trial reports the means of every step, not of
    # its last attempt's
    batches, window, timed = forever(loader), Window(), Window()
    start = restore(step_fn, loader, timed)
    startup_s = time.perf_counter() - t_enter  # this attempt's: networks, engines, data, restore
    for step in range(start, cfg.train.steps):
        if due_evaluation(cfg, step):  # after `step` steps; a resumed trial repeats it (same values)
            held_out = evaluate_trial(step_fn, cfg, dataset, shard, device, step, trial_dir)
            row = {**held_out, "step": step, "split": cfg.eval.split}
            report(row, step_fn, loader, step, timed, checkpoint=False)
        x, y, *masks = next(batches)  # (images, labels[, masks]): masks with a segment task
        x = inject_faults(cfg, step, x, rank)
        t0 = time.perf_counter()
        metrics = step_fn(x.to(device), y.to(device), step, *(m.to(device) for m in masks))
        dt = time.perf_counter() - t0
        window.add({**metrics, "step_time": dt})
        # the final report's means, search objectives (harness.search): seconds and teacher
        # forwards per training step (mc_evals is 0 on a step without teacher)
        timed.add({"step_time": dt, "mc_evals": metrics.get("mc_evals", 0.0)})
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            row = {**window.means(), "step": done, "split": "train", "rss_mb": rss_mb(),
                   "images_per_s": images_per_s(timed, cfg.train.batch_size),
                   "skipped_samples": float(loader.skipped)}
            report(row, step_fn, loader, done, timed, due_checkpoint(cfg, done))
            window = Window()
    final = evaluate_trial(step_fn, cfg, dataset, shard, device, trial_dir=trial_dir)  # rank 0 scores
    final = {**final, **timed.means(), "images_per_s": images_per_s(timed, cfg.train.batch_size),
             "startup_s": startup_s, "train_s": timed.sums.get("step_time", 0.0),
             "step": cfg.train.steps, "split": cfg.eval.split, "done": True}
    if config.get("save_to") and rank == 0:  # the warm start's run: its backbone, for every trial
        save_backbone(step_fn.networks()["joint"].model, Path(config["save_to"]) / "backbone")
    report(final, step_fn, loader, cfg.train.steps, timed, checkpoint=False)
    parallel.barrier()
    return final


def images_per_s(timed: Window, batch_size: int) -> float:
    """Σ images / Σ seconds over the run's timed steps so far, B·n / Σ_i dt_i: a mean of the
    per-step rates B/dt_i weighs a fast step more (in the ablation it put the arm with the slower
    steps ahead, its fast stage-1 steps counting as much as the slow joint ones)."""
    seconds = timed.sums.get("step_time", 0.0)
    return batch_size * timed.counts.get("step_time", 0) / seconds if seconds > 0 else float("nan")


def rss_mb() -> float:
    """Peak resident memory of this process in MiB (GPU: max_memory_allocated)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def due_evaluation(cfg: TrialConfig, step: int) -> bool:
    """A held-out evaluation before training step ``step`` (0: the untrained model)?"""
    every = cfg.eval.every
    return every > 0 and step % every == 0 and step < cfg.train.steps


def due_checkpoint(cfg: TrialConfig, done: int) -> bool:
    every = cfg.train.checkpoint_every
    return done == cfg.train.steps or (every > 0 and done % every == 0)


def report(metrics: dict[str, Any], step_fn, loader, step: int, timed: Window, checkpoint: bool) -> None:
    """``ray.train.report`` with, when due, a checkpoint of every engine and the loop's state."""
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="genrep-ckpt-") as tmp:
        save_checkpoint(Path(tmp), step_fn, loader, step, timed)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def save_checkpoint(path: Path, step_fn, loader, step: int, timed: Window) -> None:
    """Every engine, EMA copy and the loop's state (step, loader position, strategy state, the
    run's running means)."""
    state = {"step": step, "loader": loader.state_dict(), "timed": timed.state_dict(),
             **step_fn.state_dict()}
    parallel.save_checkpoint(path, step_fn.networks(), state)


def restore(step_fn, loader, timed: Window) -> int:
    """Resume from Ray Train's latest checkpoint, if any; returns the first step to run."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as path:
        step = load_checkpoint(Path(path), step_fn, loader, timed)
    log.warning("rank %d resumed from step %d", parallel.rank(), step)
    return step


def load_checkpoint(path: Path, step_fn, loader, timed: Window) -> int:
    """The inverse of :func:`save_checkpoint`; returns the first step to run."""
    state = parallel.load_checkpoint(path, step_fn.networks())
    loader.load_state_dict(state["loader"])
    timed.load_state_dict(state.get("timed", {"sums": {}, "counts": {}}))
    step_fn.load_state_dict(state)
    return int(state["step"])
