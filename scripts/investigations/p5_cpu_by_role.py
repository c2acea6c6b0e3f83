"""Investigation behind docs/performance.md, P5: why do two Ray Tune trials on 2 cores finish only
~1.5x faster together than one after the other (target 1.8)?

What it measured: P5's two sweeps (2 ``sum`` trials, ``max_concurrent`` 1 then 2, on one embedded
Ray) while a sampler reads /proc every 0.5 s: every process's CPU seconds by role (Ray Train
workers, other Ray processes, the rest), the Train workers' threads, and, over the intervals in
which both Train workers were busy, the cores every other process used beside them. The wall
ratio is split into the training steps (steps x each trial's mean step time, from the results)
and the rest (start-up, evaluation, teardown); P5 is their mediant. Then the bare two trainings
(p5_two_trainings.py) alone and beside as many idle Ray actors as the concurrent trials kept.

Conclusion (2026-12-01, 2-core Intel Xeon, 120-step trials): P5 1.54 = training steps 1.61 and
the rest 1.43. Beside the two trainings Ray's other processes used 0.22 cores, so each Train
worker got 0.886 of a core against 0.997 alone: the training half cannot pass 2 x 0.886 / 0.997 =
1.78 even if a step cost no more CPU beside another (it cost +10.4%). At 300-step trials P5 1.48
(training 1.55, rest 1.24): longer trials move P5 toward the training half, never past it. The
bare trainings reach 1.90, beside 12 idle actors 1.71. Not reachable with Ray Tune + Ray Train
trials on as many cores as trials; it needs a core to spare for Ray's control plane.

    .venv/bin/python scripts/investigations/p5_cpu_by_role.py [steps=120] [sweep]
    (Ray Tune's progress, then every measurement as one JSON object; a summary line on stderr)
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from harness.config import load
from harness.perf.common import Settings
from harness.perf.system import p5_sweep, warm_reference


def stat_cpu(stat: str) -> tuple[str, float]:
    """(name, user + system CPU seconds) from a /proc/<pid>[/task/<tid>]/stat line."""
    name, rest = stat.split("(", 1)[1].rsplit(")", 1)
    fields = rest.split()
    return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def role(cmd: str) -> str:
    if "RayTrainWorker" in cmd:
        return "train_workers"
    if cmd.startswith("ray::") or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
        return "ray_other"
    return "other"


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds) of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(entry.name)] = (cmd, stat_cpu(stat)[1])
    return out


def thread_snapshot(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds) of one process's threads."""
    out = {}
    try:
        tasks = list(os.scandir(f"/proc/{pid}/task"))
    except OSError:
        return out
    for entry in tasks:
        try:
            out[int(entry.name)] = stat_cpu(Path(entry.path, "stat").read_text())
        except OSError:  # the thread ended
            continue
    return out


class CpuSampler:
    """CPU seconds of every process during a block, by role. /proc is read every ``period`` s and
    each pid's largest cumulative figure kept, so a process that exits between samples loses at
    most one period of its CPU time."""

    def __init__(self, period: float = 0.5):
        self.period, self.seen, self.base = period, {}, {}
        self.threads: dict[tuple[int, int], tuple[str, float]] = {}  # Train workers' threads
        # per sample: (time, {Train worker pid: CPU s}, CPU s of every other process so far,
        # Ray processes started during the block and alive now, Train workers excepted)
        self.timeline: list[tuple[float, dict[int, float], float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _update(self) -> None:
        """Each pid's largest CPU figure and last non-empty command line (a zombie keeps its CPU
        time in /proc but shows an empty command line); the same per thread for Train workers."""
        now, snap = time.perf_counter(), snapshot()
        for pid, (cmd, cpu) in snap.items():
            old_cmd, old_cpu = self.seen.get(pid, ("", -1.0))
            self.seen[pid] = (cmd or old_cmd, max(cpu, old_cpu))
            if role(self.seen[pid][0]) == "train_workers":
                for tid, (name, tcpu) in thread_snapshot(pid).items():
                    old = self.threads.get((pid, tid), (name, -1.0))
                    self.threads[(pid, tid)] = (name, max(tcpu, old[1]))
        train = {pid: cpu for pid, (cmd, cpu) in self.seen.items() if role(cmd) == "train_workers"}
        rest = sum(cpu - self.base.get(pid, 0.0) for pid, (cmd, cpu) in self.seen.items() if pid not in train)
        actors = sum(1 for pid, (cmd, _) in snap.items() if pid not in self.base and pid not in train
                     and cmd.startswith("ray::"))
        self.timeline.append((now, train, rest, actors))

    def _run(self):
        while not self._stop.wait(self.period):
            self._update()

    def __enter__(self):
        self.base = {pid: cpu for pid, (_, cpu) in snapshot().items()}
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()

    def by_role(self) -> dict[str, float]:
        out = {"train_workers": 0.0, "ray_other": 0.0, "other": 0.0}
        for pid, (cmd, cpu) in self.seen.items():
            out[role(cmd)] += cpu - self.base.get(pid, 0.0)
        return {k: round(v, 1) for k, v in out.items()}

    def top(self, n: int = 8) -> list[list]:
        """The ``n`` processes that used the most CPU in the block: [seconds, command line]."""
        used = sorted(((cpu - self.base.get(pid, 0.0), cmd[:80]) for pid, (cmd, cpu) in self.seen.items()),
                      reverse=True)
        return [[round(c, 1), cmd] for c, cmd in used[:n]]

    def worker_threads(self) -> dict[str, float]:
        """CPU seconds of the Train workers' threads: per worker its busiest thread (the training
        loop's, which Ray Train runs beside the actor's own), its main thread, and the rest summed
        by thread name."""
        per_pid: dict[int, list[tuple[int, str, float]]] = {}
        for (pid, tid), (name, cpu) in self.threads.items():
            per_pid.setdefault(pid, []).append((tid, name, cpu))
        out: dict[str, float] = {}
        for pid, rows in per_pid.items():
            busiest = max(rows, key=lambda r: r[2])
            for tid, name, cpu in rows:
                key = "busiest" if tid == busiest[0] else "main" if tid == pid else f"other:{name}"
                out[key] = out.get(key, 0.0) + cpu
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.1}


def training_intervals(timeline: list[tuple[float, dict[int, float], float, int]],
                       workers: int, busy: float = 0.5) -> dict[str, float]:
    """Over the sampler's intervals in which exactly ``workers`` Train workers each used ≥ ``busy``
    of a core: the cores every other process used (``background_cores``), the mean cores per
    Train worker, and the median count of Ray processes the block started that were alive."""
    span = other = train = 0.0
    actors = []
    for (ta, wa, ra, _), (tb, wb, rb, nb) in zip(timeline, timeline[1:]):
        dt = tb - ta
        rates = [(wb[pid] - wa[pid]) / dt for pid in wb if pid in wa]
        if dt <= 0 or sum(r >= busy for r in rates) != workers:
            continue
        span, other, train = span + dt, other + (rb - ra), train + sum(r for r in rates if r >= busy) * dt
        actors.append(nb)
    if span == 0:
        return {"seconds": 0.0, "background_cores": math.nan, "worker_cores": math.nan, "ray_actors": 0}
    return {"seconds": span, "background_cores": other / span, "worker_cores": train / span / workers,
            "ray_actors": sorted(actors)[len(actors) // 2]}


def phase_ratios(serial_wall: float, concurrent_wall: float, steps: int,
                 serial_step_s: list[float], concurrent_step_s: list[float]) -> dict[str, float]:
    """P5 split into the training steps and the rest: T_serial = steps·Σ t_serial, T_concurrent =
    steps·max t_concurrent (the trials overlap), O = wall − T. P5 = (T_s + O_s)/(T_c + O_c) lies
    between T_s/T_c and O_s/O_c (a mediant) and tends to T_s/T_c as trials lengthen."""
    ts, tc = steps * sum(serial_step_s), steps * max(concurrent_step_s)
    os_, oc = serial_wall - ts, concurrent_wall - tc
    return {"train_serial_s": ts, "train_concurrent_s": tc, "rest_serial_s": os_, "rest_concurrent_s": oc,
            "training_ratio": ts / tc, "rest_ratio": os_ / oc if oc > 0 else math.nan}


def step_seconds(df) -> list[float]:
    """Each trial's mean training-step wall time (s), from its train rows."""
    rows = df[(df["split"] == "train") & (df["metric"] == "step_time")]
    return [float(v) for v in rows.groupby("trial")["value"].mean()]


def sampled_sweeps(settings: Settings) -> dict[str, dict]:
    """Both P5 sweeps on one embedded Ray, each inside a CpuSampler; then, on the same Ray, the
    bare two trainings beside as many idle actors as the concurrent trials kept alive."""
    import ray

    from harness.sweep import init_ray, run_sweep
    from p5_two_trainings import two_trainings_beside_actors

    got: dict[str, dict] = {k: {} for k in ("wall", "cpu", "top", "steps", "threads", "beside")}
    init_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="genrep-p5-sampled-") as tmp:
            for c in (1, 2):
                path = Path(tmp) / f"c{c}.yaml"
                path.write_text(yaml.safe_dump(p5_sweep(settings, Path(tmp), c)))
                start = time.perf_counter()
                with CpuSampler() as sampler:
                    df = run_sweep(load(path), overwrite=True)
                got["wall"][c] = time.perf_counter() - start
                if not (df["status"] == "ok").all():
                    raise RuntimeError(f"a trial failed (max_concurrent {c})")
                got["cpu"][c], got["top"][c] = sampler.by_role(), sampler.top(24)
                got["threads"][c], got["steps"][c] = sampler.worker_threads(), step_seconds(df)
                got["beside"][c] = training_intervals(sampler.timeline, c)
        actors = max(1, got["beside"][2]["ray_actors"])
        got["with_actors"] = two_trainings_beside_actors(settings, 40, actors)
    finally:
        ray.shutdown()
    return got


def main() -> None:
    from p5_two_trainings import two_trainings

    args = sys.argv[1:]
    settings = Settings(sweep=load(args[1] if len(args) > 1 else "sweeps/smoke.yaml").config,
                        p5_steps=int(args[0]) if args else 120)
    warm_reference(settings)
    got = sampled_sweeps(settings)
    walls, beside = got["wall"], got["beside"]
    got["phases"] = phase_ratios(walls[1], walls[2], settings.p5_steps, got["steps"][1], got["steps"][2])
    got["training_ceiling"] = 2 * beside[2]["worker_cores"] / beside[1]["worker_cores"]
    got["two_trainings"] = two_trainings(settings, 40)
    print(json.dumps({"p5": walls[1] / walls[2], **got}, indent=2, default=str))
    print(f"P5 {walls[1] / walls[2]:.2f}: training steps {got['phases']['training_ratio']:.2f} (at most "
          f"{got['training_ceiling']:.2f}: others used {beside[2]['background_cores']:.2f} cores beside them), "
          f"the rest {got['phases']['rest_ratio']:.2f}; two trainings without Ray "
          f"{got['two_trainings']['ratio']:.2f}, beside idle actors {got['with_actors']['ratio']:.2f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
