"""Investigation behind docs/performance.md, P5: which processes wake, and how often, while two
Ray trials train at once, and how often does that preempt the training?

What it measured: ``ray`` (default): P5's concurrent sweep (2 ``sum`` trials of the smoke sweep,
``steps`` long); ``bare``: the same two training steps in two plain processes, no Ray (the
two-trainings control of p5_two_trainings.py). ``at`` seconds in, every process's CPU time and
context switches (all threads, from /proc) are read twice, ``span`` seconds apart. Prints per
process: wake-ups/s (voluntary switches: each is a sleep ending in a wake-up), cores and its
busiest-waking threads; then, per training process, how often its busiest thread was preempted
(involuntary switches/s).

Conclusion (20 s of the concurrent run): 3,662 wake-ups a second in user processes (1,358 beside
the bare trainings), the busiest 0.015 cores each (the Tune result queues, GCS); each Train
worker's loop thread was preempted 893 and 1,004 times a second (the bare trainings' 115 and
124). Every Ray worker's main thread wakes every 10 ms (``CoreWorker.CheckSignal``, no setting).

    .venv/bin/python scripts/investigations/probe_wakeups.py [ray|bare] [steps=200] [at=40] [span=20]
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch.multiprocessing as mp
import yaml

from harness.config import load
from harness.perf.common import Settings
from harness.perf.system import p5_sweep, warm_reference
from p5_cpu_by_role import stat_cpu
from p5_two_trainings import training_rank

TICK = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[int, tuple[str, float, dict[str, int], dict[int, tuple[float, int]]]]:
    """pid -> (command line, CPU s, {thread name: voluntary context switches},
    {tid: (CPU s, involuntary context switches)})."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            _, cpu = stat_cpu(Path(entry.path, "stat").read_text())
            switches: dict[str, int] = {}
            threads: dict[int, tuple[float, int]] = {}
            for task in os.scandir(f"{entry.path}/task"):
                status = Path(task.path, "status").read_text()
                name = status.split("\n", 1)[0].split(":", 1)[1].strip()
                n = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
                switches[name] = switches.get(name, 0) + n
                preempted = int(status.split("\nnonvoluntary_ctxt_switches:")[1].split()[0])
                threads[int(task.name)] = (stat_cpu(Path(task.path, "stat").read_text())[1],
                                           preempted)
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry.name)] = (cmd.strip(), cpu, switches, threads)
    return out


def run_ray(settings: Settings, probe: threading.Thread) -> None:
    import ray

    from harness.sweep import init_ray, run_sweep

    warm_reference(settings)
    init_ray()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c2.yaml"
            path.write_text(yaml.safe_dump(p5_sweep(settings, Path(tmp), 2)))
            probe.start()
            run_sweep(load(path), overwrite=True)
            probe.join()
    finally:
        ray.shutdown()


def run_bare(settings: Settings, steps: int, probe: threading.Thread) -> None:
    ctx = mp.get_context("spawn")
    barrier, raw = ctx.Barrier(2), settings.sweep.plain()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=training_rank, args=(i, raw, steps, barrier, tmp)) for i in (0, 1)]
        for p in procs:
            p.start()
        probe.start()
        for p in procs:
            p.join()
        probe.join()


def main() -> None:
    argv = sys.argv[1:]
    mode = argv.pop(0) if argv and argv[0] in ("ray", "bare") else "ray"
    args = [int(a) for a in argv[:3]]
    steps, at, span = args + [200, 40, 20][len(args):]
    settings = Settings(sweep=load("sweeps/smoke.yaml").config, p5_steps=steps)
    snaps: list[tuple[float, dict]] = []

    def probe() -> None:
        time.sleep(at)
        snaps.append((time.perf_counter(), snapshot()))
        time.sleep(span)
        snaps.append((time.perf_counter(), snapshot()))

    thread = threading.Thread(target=probe)
    run_ray(settings, thread) if mode == "ray" else run_bare(settings, steps, thread)
    report(snaps, "RayTrainWorker" if mode == "ray" else "spawn_main")


def report(snaps: list[tuple[float, dict]], training: str) -> None:
    (ta, a), (tb, b) = snaps
    dt, rows = tb - ta, []
    for pid, (cmd, cpu, switches, threads) in b.items():
        if pid in a and cmd:  # an empty command line: a kernel thread
            per = {k: (v - a[pid][2].get(k, 0)) / dt for k, v in switches.items()}
            rows.append((sum(per.values()), (cpu - a[pid][1]) / dt, cmd, per, pid))
    rows.sort(reverse=True, key=lambda r: r[0])
    print(f"{dt:.0f} s window: {sum(r[0] for r in rows):.0f} wake-ups/s in user processes, "
          f"{sum(r[1] for r in rows):.3f} cores in all")
    for wakeups, cores, cmd, per, _ in rows[:30]:
        top = sorted(per.items(), key=lambda kv: -kv[1])[:3]
        print(f"{wakeups:7.1f}/s {cores:6.3f}  {cmd[:60]:60s} " + ", ".join(f"{k} {v:.0f}" for k, v in top if v >= 1))
    for pid, (cmd, _, _, threads) in b.items():
        if training in cmd and pid in a:
            tid = max(threads, key=lambda t: threads[t][0] - a[pid][3].get(t, (0.0, 0))[0])
            cpu0, pre0 = a[pid][3].get(tid, (0.0, 0))
            print(f"training process {pid}: busiest thread {(threads[tid][0] - cpu0) / dt:.3f} cores, "
                  f"preempted {(threads[tid][1] - pre0) / dt:.0f} times/s")


if __name__ == "__main__":
    main()
