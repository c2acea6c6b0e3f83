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
import os
import signal
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch

from harness.config import TrialConfig, trial_from_dict
from harness.data import make_loader
from harness import parallel
from harness.parallel import Shard
from harness.step import make_step

log = logging.getLogger(__name__)


def forever(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epochs; each new epoch reshuffles (the loader advances its own epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training split yields no full batch: fewer samples than one "
                               "batch per worker")


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
    """Ray Train's ``train_loop_per_worker``: ``config = {"trial": TrialConfig dict, "urls": {...}}``.

    Returns the final (held-out) report: Ray Train V2 keeps in ``Result.metrics_dataframe`` only
    reports that came with a kept checkpoint, so ``genrep-bench train`` reads the final one here.
    """
    import ray.train

    cfg: TrialConfig = trial_from_dict(config["trial"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device() if cfg.resources.gpus_per_worker else torch.device("cpu")
    shard = Shard(rank, world, cfg.train.batch_size // world)
    step_fn = make_step(cfg, shard, device)
    prepare_teacher(step_fn, cfg, config["urls"], device)
    loader = make_loader(config["urls"]["train"], shard.local, rank=rank, world_size=world,
                         num_workers=cfg.data.num_workers, seed=cfg.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, on_bad_sample=cfg.data.on_bad_sample,
                         image_size=cfg.data.image_size, labelled_fraction=cfg.data.labelled_fraction,
                         label_seed=cfg.data.label_seed, **mask_options(cfg, config["urls"]))
    # timed: the whole run's means (the final report's step_time and mc_evals), checkpointed so
    # that a resumed trial reports the means of every step, not of its last attempt's
    batches, window, timed = forever(loader), Window(), Window()
    start = restore(step_fn, loader, timed)
    for step in range(start, cfg.train.steps):
        if due_evaluation(cfg, step):  # after `step` steps; a resumed trial repeats it (same values)
            row = {**evaluate(step_fn, cfg, config["urls"], shard, device, step), "step": step,
                   "split": cfg.eval.split}
            report(row, step_fn, loader, step, timed, checkpoint=False)
        x, y, *masks = next(batches)  # (images, labels[, masks]): masks with a segment task
        x = inject_faults(cfg, step, x, rank)
        t0 = time.perf_counter()
        metrics = step_fn(x.to(device), y.to(device), step, *(m.to(device) for m in masks))
        dt = time.perf_counter() - t0
        window.add({**metrics, "step_time": dt, "images_per_s": cfg.train.batch_size / dt})
        # the final report's means, search objectives (harness.search): seconds and teacher
        # forwards per training step (mc_evals is 0 on a step without teacher)
        timed.add({"step_time": dt, "mc_evals": metrics.get("mc_evals", 0.0)})
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            row = {**window.means(), "step": done, "split": "train", "rss_mb": rss_mb(),
                   "skipped_samples": float(loader.skipped)}
            report(row, step_fn, loader, done, timed, due_checkpoint(cfg, done))
            window = Window()
    final = evaluate(step_fn, cfg, config["urls"], shard, device)
    final = {**final, **timed.means(), "step": cfg.train.steps, "split": cfg.eval.split, "done": True}
    report(final, step_fn, loader, cfg.train.steps, timed, checkpoint=False)
    parallel.barrier()
    return final


def mask_options(cfg: TrialConfig, urls: dict[str, Any]) -> dict[str, Any]:
    """The loader's mask arguments: masks when ``segment`` is a perception task, bounded by the
    manifest's mask classes (harness.trial.prepare_data), else by the seg head's C + 1."""
    if "segment" not in cfg.method.perception.tasks:
        return {}
    return {"masks": True, "mask_classes": urls.get("mask_classes", cfg.model_config().seg_classes)}


def prepare_teacher(step_fn, cfg: TrialConfig, urls: dict[str, Any], device) -> None:
    """The teacher's calibration images (``mc.tau: auto``: the first ``calibrate_images`` of the
    val split, the split for choosing, never the test split that reports) and its class prior
    (``mc.prior: train``: the training split's class frequencies from the manifest)."""
    from harness.evaluate_trial import load_split

    mc = cfg.method.mc
    if mc.tau == "auto":
        x, y = load_split(urls["val"])
        step_fn.calibration = (x[: mc.calibrate_images].to(device), y[: mc.calibrate_images].to(device))
    if mc.prior == "train":
        if "class_counts" not in urls:
            raise ValueError("method.mc.prior: train needs the training split's class counts, which "
                             "only a packed dataset's manifest has (data.urls gives none)")
        step_fn.prior = torch.tensor(urls["class_counts"], dtype=torch.float64, device=device)


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


# ---------------------------------------------------------------- fault injection (tests only)
# Hooks for the reliability tests (docs/reliability.md); inert unless the variable is set. Value:
# "N" (every trial) or "N:arm" (only the trials of that strategy or variant label), N a 0-based
# step index or a comma-separated list of them ("5,10": a kill before each, so a trial dies and
# resumes twice).
FAULT_KILL = "GENREP_FAULT_KILL_AT_STEP"  # SIGKILL rank 0 before step N (or each of N,M,...), once each
FAULT_NAN = "GENREP_FAULT_NAN_AT_STEP"  # feed an all-NaN batch at step N, on every attempt


def fault_steps(var: str, cfg: TrialConfig) -> set[int]:
    spec = os.environ.get(var, "")
    if not spec:
        return set()
    steps, _, arm = spec.partition(":")
    return {int(s) for s in steps.split(",")} if arm in ("", cfg.strategy.name, cfg.variant) else set()


def inject_faults(cfg: TrialConfig, step: int, x: torch.Tensor, rank: int) -> torch.Tensor:
    """The batch to train on at ``step``, after the test-only fault hooks had their say.

    The kill hook leaves a marker in the run's storage directory first, so the attempt that Ray
    Train restarts from the last checkpoint runs through instead of dying again, and waits until
    the controller has taken this worker's last report (:func:`wait_for_reports_taken`): the
    kill then tests resumption from a known checkpoint, the one reported just before.
    """
    if step in fault_steps(FAULT_NAN, cfg):
        x = torch.full_like(x, float("nan"))
    if step in fault_steps(FAULT_KILL, cfg) and rank == 0:
        marker = fault_dir() / f"genrep-fault-kill-{cfg.hash()}-step{step}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            wait_for_reports_taken()
            log.warning("fault injection: SIGKILL of rank 0 before step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
    return x


def wait_for_reports_taken(timeout: float = 120.0) -> None:
    """Wait until Ray Train's controller has polled this worker's result queue empty.

    ``ray.train.report`` returns once the result (and its checkpoint, already on storage) is on a
    one-slot queue that the controller polls; a worker killed before the poll loses that report,
    and Ray Train restarts from the checkpoint before it (correct, but then a test cannot know
    which). Test-only (the kill hook); Ray internals, so a Ray without them waits 5 s instead."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        queue = get_train_context().get_result_queue()
    except (ImportError, AttributeError):
        time.sleep(5.0)
        return
    deadline = time.monotonic() + timeout
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the controller handles the result it took in the same poll


def fault_dir() -> Path:
    """This Ray Train run's directory on (local) storage; it outlives the killed worker."""
    import ray.train

    return Path(ray.train.get_context().get_storage().experiment_fs_path)


def evaluate(step_fn, cfg: TrialConfig, urls: dict[str, Any], shard: Shard, device,
             step: int | None = None) -> dict[str, float]:
    """Held-out metrics (rank 0 scores, the others wait); ``step``: an evaluation during training."""
    from harness.evaluate_trial import evaluate_trial

    return evaluate_trial(step_fn, cfg, urls, shard, device, step)
