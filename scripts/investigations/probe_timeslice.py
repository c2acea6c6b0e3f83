"""Investigation behind docs/performance.md, P5: does sharing the 2 cores with light,
frequently-waking processes inflate the CPU a training step costs?

What it measured: ``two_trainings`` (p5_two_trainings.py: the smoke trial's real step, alone
twice, then two at once, no Ray) while two background processes each wake every 2 ms and spin
for ``duty`` of it (default 0.15: ~15% of a core each, preempting the trainings constantly); the
steps' CPU alone and together, to compare with the same run at duty 0 (no background load).

Conclusion: preemption by itself costs the two trainings only 0.5-1% more CPU. A spin loop
touches no memory; a Ray process's wake-up runs Python and gRPC code, which the idle-actor
control of p5_two_trainings.py measures instead (that one does cost: 1.90 -> 1.71).

    .venv/bin/python scripts/investigations/probe_timeslice.py [duty]
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time

from harness.config import load
from harness.perf.common import Settings
from p5_two_trainings import two_trainings


def background(stop, duty: float) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < 0.002 * duty:
            pass
        time.sleep(0.002 * (1 - duty))


def main() -> None:
    duty = float(sys.argv[1]) if len(sys.argv) > 1 else 0.15
    settings = Settings(sweep=load("sweeps/smoke.yaml").config)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    load_procs = [ctx.Process(target=background, args=(stop, duty)) for _ in range(2)] if duty > 0 else []
    for p in load_procs:
        p.start()
    try:
        got = two_trainings(settings, 40)
    finally:
        stop.set()
        for p in load_procs:
            p.join()
    alone = sum(r["cpu_s"] for r in got["alone"]) / 2
    together = sum(r["cpu_s"] for r in got["together"]) / 2
    print(f"background duty {duty}: 40 steps cost {alone:.2f} CPU-s alone, {together:.2f} two at "
          f"once (x{got['cpu_inflation']:.3f}); serial / concurrent wall {got['ratio']:.2f}")


if __name__ == "__main__":
    main()
