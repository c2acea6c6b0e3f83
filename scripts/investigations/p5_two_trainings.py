"""Investigation behind docs/performance.md, P5: what does this machine give two trainings at once,
without Ray, and how much of that do idle Ray actors take away?

What it measured: the smoke trial's own training step (``make_step``: DeepSpeed engine, the sweep's
teacher, one torch thread, no Ray, timed after a warm-up of one teacher period) run alone twice,
one after the other, then two processes at once (a barrier starts their timing together). The
serial ÷ concurrent wall of the two is the most any scheduler can make of two trials on this
machine (shared caches and memory bandwidth, or a hypervisor's vCPUs, keep it below 2). The
same is then run beside N idle Ray actors (``num_cpus=0``; each only exists: Ray's worker loop,
its 10-ms ``CheckSignal`` timer, gRPC polls), as many as two concurrent P5 trials keep alive.

Conclusion (2026-12-01, 2-core Intel Xeon, 40 steps): the bare two trainings reach 1.84-1.94
(1.90 in the table's run); beside 12 idle Ray actors 1.71 (1.65-1.73 over the session's probes,
1.86 with Ray up and no actors). A Ray actor costs the cores even when it does nothing (0.004
cores, 149 wake-ups a second each): that, not the trainings, is what holds P5 below 1.8.

    .venv/bin/python scripts/investigations/p5_two_trainings.py [steps=40] [actors=12] [sweep]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from harness.config import from_dict, load
from harness.perf.common import Settings, process_group, synthetic_batch
from harness.perf.steps import build


def training_rank(index: int, raw: dict, steps: int, barrier, out: str) -> None:
    """``steps`` of the trial's training step after a teacher period's warm-up: wall and CPU s."""
    torch.set_num_threads(1)
    sweep = from_dict(raw)
    cfg = sweep.trial("sum", sweep.seeds[0])
    with process_group():
        step_fn = build("harness", cfg)
        x, y = synthetic_batch(cfg)
        warm = max(cfg.method.mc.every, 2)  # a whole teacher period
        for step in range(warm):
            step_fn(x, y, step)
        if barrier is not None:
            barrier.wait()
        wall, cpu = time.perf_counter(), time.process_time()
        for step in range(warm, warm + steps):
            step_fn(x, y, step)
        took = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    Path(out, f"{index}.json").write_text(json.dumps(took))


def two_trainings(settings: Settings, steps: int) -> dict[str, Any]:
    """The trial's training step alone (twice, one after the other), then two at the same time:
    the serial ÷ concurrent wall and the CPU a step costs together ÷ alone."""
    ctx, raw = mp.get_context("spawn"), settings.sweep.plain()

    def run(indices, barrier, tmp):
        procs = [ctx.Process(target=training_rank, args=(i, raw, steps, barrier, tmp)) for i in indices]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"a training process failed (exit code {p.exitcode})")
        return [json.loads(Path(tmp, f"{i}.json").read_text()) for i in indices]

    with tempfile.TemporaryDirectory(prefix="genrep-two-trainings-") as tmp:
        alone = run([0], None, tmp) + run([1], None, tmp)
        together = run([2, 3], ctx.Barrier(2), tmp)
    return {"steps": steps, "alone": alone, "together": together,
            "ratio": sum(a["wall_s"] for a in alone) / max(t["wall_s"] for t in together),
            "cpu_inflation": sum(t["cpu_s"] for t in together) / sum(a["cpu_s"] for a in alone)}


class IdleActor:
    """A Ray actor that does nothing: what each of a trial's helper processes costs by existing."""

    def pid(self) -> int:
        return os.getpid()


def two_trainings_beside_actors(settings: Settings, steps: int, actors: int) -> dict[str, Any]:
    """``two_trainings`` while ``actors`` idle Ray actors exist (Ray must be initialised)."""
    import ray

    handles = [ray.remote(num_cpus=0)(IdleActor).remote() for _ in range(actors)]
    try:
        ray.get([h.pid.remote() for h in handles])
        return {**two_trainings(settings, steps), "actors": actors}
    finally:
        for h in handles:
            ray.kill(h)


def main() -> None:
    import ray

    from harness.sweep import init_ray

    args = sys.argv[1:]
    steps, actors = int(args[0]) if args else 40, int(args[1]) if len(args) > 1 else 12
    settings = Settings(sweep=load(args[2] if len(args) > 2 else "sweeps/smoke.yaml").config)
    bare = two_trainings(settings, steps)
    init_ray()
    try:
        beside = two_trainings_beside_actors(settings, steps, actors)
    finally:
        ray.shutdown()
    print(f"two trainings of {steps} steps, serial / concurrent wall: {bare['ratio']:.2f} without Ray "
          f"(step CPU x{bare['cpu_inflation']:.3f} together), {beside['ratio']:.2f} beside {actors} idle "
          f"Ray actors (x{beside['cpu_inflation']:.3f})")


if __name__ == "__main__":
    main()
