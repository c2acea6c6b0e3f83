"""Peak memory of one step configuration, each in a fresh subprocess.

A process's peak RSS only grows, and freed heap pages stay resident, so configurations measured
one after another in one process would hide each other's peaks. Each configuration therefore
runs in its own interpreter: build the step, read RSS (``setup_rss_mb``: imports, model, engine,
optimizer), reset the kernel's high-water mark, run the steps, read it again (``peak_rss_mb``).
``step_peak_mb`` = peak − setup is what the training step itself adds (activations, gradients,
teacher chunks).

The reset matters: set-up itself peaks far above the steady state (1,069 MiB here, somewhere in
the imports and the engine's construction, against
~0.47 GiB once the step is built), so ``ru_maxrss``, which cannot be reset, reported the same
1069 MiB for every configuration. ``echo 5 > /proc/self/clear_refs``
(Linux ≥ 4.0) resets ``VmHWM`` to the current RSS; where it cannot, ``ru_maxrss`` is used and
``peak_reset`` is False in the result.

Run as ``python -m harness.perf.memory '<json>'``; the last stdout line is the JSON result.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any

from harness.config import TrialConfig

MARK = "PERF_MEMORY "


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Set the high-water mark (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(reset: bool = True) -> float:
    """VmHWM since the last :func:`reset_peak_rss` (``reset``), else the process's ru_maxrss."""
    if reset:
        return _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(spec: dict[str, Any]) -> dict[str, float]:
    import torch

    from harness.config import trial_from_dict
    from harness.perf.common import process_group, synthetic_batch
    from harness.perf.steps import build

    torch.set_num_threads(spec["threads"])
    cfg = trial_from_dict(spec["trial"])
    with process_group():
        step_fn = build(spec["kind"], cfg)
        x, y = synthetic_batch(cfg)
        setup = current_rss_mb()
        reset = reset_peak_rss()
        for step in range(spec["steps"]):
            step_fn(x, y, step)
        peak = peak_rss_mb(reset)
    return {"setup_rss_mb": setup, "peak_rss_mb": peak, "step_peak_mb": peak - setup,
            "peak_reset": reset}


def _command(kind: str, cfg: TrialConfig, steps: int, threads: int) -> list[str]:
    spec = {"kind": kind, "trial": cfg.to_dict(), "steps": steps, "threads": threads}
    return [sys.executable, "-m", "harness.perf.memory", json.dumps(spec)]


def _parse(name: str, proc: subprocess.CompletedProcess | Any, out: str, err: str) -> dict[str, float]:
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"memory measurement of {name!r} failed (rc {proc.returncode}):\n{err[-2000:]}")


def measure_memory(configs: dict[str, tuple[str, TrialConfig]], steps: int, threads: int,
                   parallel: bool = False) -> dict[str, dict[str, float]]:
    """name -> {setup_rss_mb, peak_rss_mb, step_peak_mb}; one fresh subprocess per configuration
    (``parallel``: all at once, for --quick: peaks are per process, so they do not mix)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmds = {n: _command(kind, cfg, steps, threads) for n, (kind, cfg) in configs.items()}
    if not parallel:
        done = {n: subprocess.run(c, capture_output=True, text=True, env=env) for n, c in cmds.items()}
        return {n: _parse(n, p, p.stdout, p.stderr) for n, p in done.items()}
    procs = {n: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for n, c in cmds.items()}
    results = {}
    for n, p in procs.items():
        out, err = p.communicate()
        results[n] = _parse(n, p, out, err)
    return results


if __name__ == "__main__":
    print(MARK + json.dumps(child(json.loads(sys.argv[1]))), flush=True)
