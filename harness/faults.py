"""Fault injection for the reliability tests (docs/reliability.md): inert unless a variable is set.

Value: "N" (every trial) or "N:arm" (only the trials of that strategy or variant label), N a 0-based
step index or a comma-separated list of them ("5,10": a kill before each, so a trial dies and
resumes twice). The training loop asks :func:`inject_faults` for each batch; nothing else here is
called from outside.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch

from harness.config import TrialConfig

log = logging.getLogger(__name__)

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
