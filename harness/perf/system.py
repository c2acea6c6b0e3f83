"""P4-P7: the data loader, concurrent trials, ZeRO's memory saving, the smoke sweep's wall time.

P4  webdataset loader images/s (PNG decode, 1 thread, no DataLoader workers: what a worker with
    ``num_workers: 0`` does between steps) ÷ the harness training step's images/s (P1's ``sum``);
P5  2 tiny real Ray Tune trials through ``run_sweep``: serial wall (max_concurrent 1) ÷
    concurrent wall (max_concurrent 2), with every process's CPU seconds by role, the ratio split
    into the training steps and the rest, the cores Ray's other processes took beside the
    training, and two controls: two of the trial's training steps at once without Ray (the
    machine's ceiling), and the same beside as many idle Ray actors as the trials kept alive;
P6  optimizer-state bytes per worker, ZeRO-2 ÷ ZeRO-0, real engines in 2 spawned gloo processes;
P7  ``genrep-bench sweep sweeps/smoke.yaml`` wall time, in a fresh process, into a temp dir
    (packed shards and the reference classifier come from the shared cache: a warm-cache figure).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import yaml

from harness.perf.common import Row, Settings, free_port, load_average, plain, process_group

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- P4
def p4_row(settings: Settings, step: dict[str, Any]) -> Row:
    from harness.data import ensure_packed, load_manifest, loader_throughput
    from harness.trial import data_root

    d = settings.sweep.data
    params = dict(shard_size=d.shard_size, image_size=d.image_size, split=d.split, seed=0)
    if d.count is not None:
        params["count"] = d.count
    manifest = ensure_packed(d.source, data_root(settings.sweep), **params)  # as prepare_data packs
    seconds = 1.0 if settings.quick else 3.0
    runs = [loader_throughput(load_manifest(manifest), batch_size=step["batch"], seconds=seconds)
            for _ in range(1 if settings.quick else 3)]
    loader = sorted(runs)[len(runs) // 2]
    raw = {"loader_images_per_s": loader, "loader_runs": runs, "seconds_per_run": seconds,
           "step_images_per_s": step["step_images_per_s"],
           "step_images_per_s_default_teacher": step["step_images_per_s_kd"], "batch": step["batch"]}
    return Row("P4", "loader images/s (1 thread, PNG decode) ÷ training step images/s (sum, teacher off)",
               loader / step["step_images_per_s"], ">=", 10.0, raw)


# ---------------------------------------------------------------- P5
def p5_sweep(settings: Settings, out: Path, concurrent: int) -> dict[str, Any]:
    """The base sweep cut to 2 short trials (2 seeds of ``sum``) with ``max_concurrent``."""
    from harness.trial import data_root

    base, steps = plain(settings.sweep), p5_steps(settings)
    return {**base, "name": f"perf-p5-c{concurrent}", "output_dir": str(out / f"c{concurrent}"),
            "strategies": ["sum"], "seeds": [0, 1],
            "data": {**base["data"], "root": str(data_root(settings.sweep))},
            "train": {**base["train"], "steps": steps, "log_every": steps},
            "eval": {**base["eval"], "mc_images": 16, "samples_per_class": 1, "ddim_steps": 4},
            "resources": {**base["resources"], "workers": 1, "max_concurrent": concurrent,
                          "max_failures": 0}}


def p5_steps(settings: Settings) -> int:
    """``--p5-steps``, or the smoke sweep's trial length (120 steps); 20 with --quick."""
    if settings.p5_steps is not None:
        return settings.p5_steps
    return 20 if settings.quick else 120


class CpuSampler:
    """CPU seconds (user + system) of every process on the machine during a block, by role:
    Ray Train workers (the training itself), other Ray processes (GCS, raylet, dashboard, Tune
    and Train controllers, idle workers) and everything else (this driver included).

    /proc is read every ``period`` seconds and each pid's largest cumulative figure kept, so a
    process that exits between samples loses at most one period of its CPU time.
    """

    def __init__(self, period: float = 0.5):
        import threading

        self.period, self.seen, self.base = period, {}, {}
        self.threads: dict[tuple[int, int], tuple[str, float]] = {}  # Train workers' threads
        # per sample: (time, {Train worker pid: CPU s}, CPU s of every other process so far,
        # Ray processes started during the block and alive now, Train workers excepted)
        self.timeline: list[tuple[float, dict[int, float], float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def stat_cpu(stat: str) -> tuple[str, float]:
        """(name, user + system CPU seconds) from a /proc/<pid>[/task/<tid>]/stat line."""
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()
        return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def snapshot() -> dict[int, tuple[str, float]]:
        out = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(entry.name)] = (cmd, CpuSampler.stat_cpu(stat)[1])
        return out

    @staticmethod
    def thread_snapshot(pid: int) -> dict[int, tuple[str, float]]:
        """tid -> (thread name, CPU seconds) of one process's threads."""
        out = {}
        try:
            tasks = list(os.scandir(f"/proc/{pid}/task"))
        except OSError:
            return out
        for entry in tasks:
            try:
                out[int(entry.name)] = CpuSampler.stat_cpu(Path(entry.path, "stat").read_text())
            except OSError:
                continue
        return out

    def _update(self) -> None:
        """Each pid's largest CPU figure, and its last non-empty command line (an exiting process,
        a zombie, still shows its CPU time in /proc but an empty command line); the same per
        thread for the Train workers."""
        now, snap = time.perf_counter(), self.snapshot()
        for pid, (cmd, cpu) in snap.items():
            old_cmd, old_cpu = self.seen.get(pid, ("", -1.0))
            self.seen[pid] = (cmd or old_cmd, max(cpu, old_cpu))
            if self.role(self.seen[pid][0]) == "train_workers":
                for tid, (name, tcpu) in self.thread_snapshot(pid).items():
                    old = self.threads.get((pid, tid), (name, -1.0))
                    self.threads[(pid, tid)] = (name, max(tcpu, old[1]))
        train = {pid: cpu for pid, (cmd, cpu) in self.seen.items() if self.role(cmd) == "train_workers"}
        rest = sum(cpu - self.base.get(pid, 0.0) for pid, (cmd, cpu) in self.seen.items() if pid not in train)
        actors = sum(1 for pid, (cmd, _) in snap.items() if pid not in self.base and pid not in train
                     and cmd.startswith("ray::"))
        self.timeline.append((now, train, rest, actors))

    def _run(self):
        while not self._stop.wait(self.period):
            self._update()

    def __enter__(self):
        self.base = {pid: cpu for pid, (_, cpu) in self.snapshot().items()}
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()

    @staticmethod
    def role(cmd: str) -> str:
        if "RayTrainWorker" in cmd:
            return "train_workers"
        if cmd.startswith("ray::") or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
            return "ray_other"
        return "other"

    def top(self, n: int = 8) -> list[list]:
        """The ``n`` processes that used the most CPU in the block: [seconds, command line]."""
        used = sorted(((cpu - self.base.get(pid, 0.0), cmd[:80]) for pid, (cmd, cpu) in self.seen.items()),
                      reverse=True)
        return [[round(c, 1), cmd] for c, cmd in used[:n]]

    def worker_threads(self) -> dict[str, float]:
        """CPU seconds of the Train workers' threads: per worker, its busiest thread (the training
        loop's, which Ray Train runs beside the actor's own), its main thread and the rest
        summed by thread name (Python threads carry the process's name)."""
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

    def by_role(self) -> dict[str, float]:
        out = {"train_workers": 0.0, "ray_other": 0.0, "other": 0.0}
        for pid, (cmd, cpu) in self.seen.items():
            out[self.role(cmd)] += cpu - self.base.get(pid, 0.0)
        return {k: round(v, 1) for k, v in out.items()}


def training_intervals(timeline: list[tuple[float, dict[int, float], float, int]],
                       workers: int, busy: float = 0.5) -> dict[str, float]:
    """What ran beside the training: over the sampler's intervals in which exactly ``workers``
    Train workers each used ≥ ``busy`` of a core, the cores every other process used
    (``background_cores``), the mean cores per Train worker, and the median count of Ray
    processes the block started (Train workers excepted) that were alive."""
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
    """P5 split into the trials' training steps and everything else (start-up, evaluation,
    teardown, scheduling), from each trial's mean step time:
    T_serial = steps·Σ t_serial, T_concurrent = steps·max t_concurrent (the trials overlap),
    O = wall − T; training ratio T_serial/T_concurrent, the rest O_serial/O_concurrent.
    P5 = (T_s + O_s)/(T_c + O_c) lies between the two (a mediant), and as trials lengthen O stays
    put, so P5 tends to the training ratio: with both below a target, no trial length meets it."""
    ts, tc = steps * sum(serial_step_s), steps * max(concurrent_step_s)
    os_, oc = serial_wall - ts, concurrent_wall - tc
    return {"train_serial_s": ts, "train_concurrent_s": tc, "rest_serial_s": os_, "rest_concurrent_s": oc,
            "training_ratio": ts / tc, "rest_ratio": os_ / oc if oc > 0 else math.nan}


class IdleActor:
    """A Ray actor that does nothing: what each of a trial's helper processes costs the cores
    when it only exists (Ray's worker loop, gRPC polls)."""

    def pid(self) -> int:
        return os.getpid()


def two_trainings_beside_actors(settings: Settings, steps: int, actors: int) -> dict[str, Any]:
    """``two_trainings`` (no Ray in the trainings) while ``actors`` idle Ray actors exist: the
    part of P5's loss that is the mere presence of Ray's per-trial processes."""
    import ray

    idle = ray.remote(num_cpus=0)(IdleActor)
    handles = [idle.remote() for _ in range(actors)]
    try:
        ray.get([h.pid.remote() for h in handles])
        return {**two_trainings(settings, steps), "actors": actors}
    finally:
        for h in handles:
            ray.kill(h)


def _training_rank(index: int, raw: dict, steps: int, barrier, out: str) -> None:
    """P5's machine floor: ``steps`` of the trial's own training step (``make_step``: DeepSpeed
    engine, the sweep's teacher), 1 thread, no Ray, timed after warm-up (wall and CPU seconds);
    with a barrier, every process starts timing together."""
    torch.set_num_threads(1)
    from harness.config import from_dict
    from harness.perf.common import synthetic_batch
    from harness.step import Shard, make_step

    sweep = from_dict(raw)
    cfg = sweep.trial("sum", sweep.seeds[0])
    with process_group():
        step_fn = make_step(cfg, Shard(0, 1, cfg.train.batch_size), torch.device("cpu"))
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
    """What this machine gives two single-threaded trainings at once, with no Ray and no start-up:
    the trial's training step alone (twice, one after the other) and two of it at the same time.
    Their ratio is the most any scheduler can make of two trials here (shared caches and memory
    bandwidth, or a hypervisor's vCPUs, make it less than 2)."""
    ctx = mp.get_context("spawn")
    raw = plain(settings.sweep)

    def run(indices, barrier, tmp):
        procs = [ctx.Process(target=_training_rank, args=(i, raw, steps, barrier, tmp)) for i in indices]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"P5: a training process failed (exit code {p.exitcode})")
        return [json.loads(Path(tmp, f"{i}.json").read_text()) for i in indices]

    with tempfile.TemporaryDirectory(prefix="genrep-perf-p5-two-") as tmp:
        alone = run([0], None, tmp) + run([1], None, tmp)
        together = run([2, 3], ctx.Barrier(2), tmp)
    return {"steps": steps, "alone": alone, "together": together,
            "ratio": sum(a["wall_s"] for a in alone) / max(t["wall_s"] for t in together),
            "cpu_inflation": sum(t["cpu_s"] for t in together) / sum(a["cpu_s"] for a in alone)}


def warm_reference(settings: Settings) -> None:
    """Train (or load) the cached reference classifier now, so neither timed sweep pays for it."""
    from harness.evaluate import reference_classifier
    from harness.evaluate_trial import load_split
    from harness.trial import prepare_data

    urls = prepare_data(settings.sweep)
    val, train = load_split(urls[settings.sweep.eval.split]), load_split(urls["train"])
    reference_classifier(Path(urls["cache"]) / "reference", urls["key"], *train, *val, seed=0)


def step_seconds(df) -> list[float]:
    """Each trial's mean training-step wall time (s), from its train rows."""
    rows = df[(df["split"] == "train") & (df["metric"] == "step_time")]
    return [float(v) for v in rows.groupby("trial")["value"].mean()]


def p5_sweeps(settings: Settings) -> dict[str, dict]:
    """Both P5 sweeps on embedded Ray, each inside a ``CpuSampler``; then, on the same Ray, the
    bare two trainings beside as many idle Ray actors as the concurrent run's trials kept alive
    while they trained. Keyed by measurement, then by ``max_concurrent``."""
    import ray

    from harness.sweep import init_ray, run_sweep

    got: dict[str, dict] = {k: {} for k in ("wall", "load", "cpu", "top", "steps", "threads", "beside")}
    init_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="genrep-perf-p5-") as tmp:
            for c in (1, 2):
                path = Path(tmp) / f"c{c}.yaml"
                path.write_text(yaml.safe_dump(p5_sweep(settings, Path(tmp), c)))
                got["load"][c], start = load_average(), time.perf_counter()
                with CpuSampler() as sampler:
                    df = run_sweep(path, overwrite=True)
                got["wall"][c] = time.perf_counter() - start
                if not (df["status"] == "ok").all():
                    raise RuntimeError(f"P5: a trial failed (max_concurrent {c})")
                got["cpu"][c], got["top"][c] = sampler.by_role(), sampler.top(24)
                got["threads"][c], got["steps"][c] = sampler.worker_threads(), step_seconds(df)
                got["beside"][c] = training_intervals(sampler.timeline, c)
        actors = max(1, got["beside"][2]["ray_actors"])
        got["with_actors"] = two_trainings_beside_actors(settings, p5_trainings(settings), actors)
    finally:
        ray.shutdown()
    return got


def p5_trainings(settings: Settings) -> int:
    """Steps of the bare two-trainings controls: 40 (steady state), 4 with --quick."""
    return 4 if settings.quick else 40


def p5_row(settings: Settings) -> Row:
    warm_reference(settings)
    got = p5_sweeps(settings)
    walls, cpu, beside, with_actors = got["wall"], got["cpu"], got["beside"], got["with_actors"]
    cores = len(os.sched_getaffinity(0))
    # the best a concurrent run can do on `cores` cores is all of them busy: wall ≥ CPU / cores
    bound = walls[1] / (sum(cpu[2].values()) / cores)
    machine = two_trainings(settings, p5_trainings(settings))
    phases = phase_ratios(walls[1], walls[2], p5_steps(settings), got["steps"][1], got["steps"][2])
    raw = {"serial_wall_s": walls[1], "concurrent_wall_s": walls[2], "trials": 2,
           "steps_per_trial": p5_steps(settings), "load_before": got["load"],
           "cpu_s_serial": cpu[1], "cpu_s_concurrent": cpu[2], "cores": cores,
           "cpu_bound_ratio": bound, **phases,
           "background_cores_serial": beside[1]["background_cores"],
           "background_cores_concurrent": beside[2]["background_cores"],
           "worker_cores_serial": beside[1]["worker_cores"],
           "worker_cores_concurrent": beside[2]["worker_cores"],
           # the training steps' ratio if a step cost no more CPU beside another: each worker's
           # share of the cores, concurrent over serial, times the 2 trials
           "training_ceiling": 2 * beside[2]["worker_cores"] / beside[1]["worker_cores"],
           "ray_actors_concurrent": beside[2]["ray_actors"],
           "two_trainings_ratio": machine["ratio"], "two_trainings_beside_actors_ratio": with_actors["ratio"],
           "beside_training": beside, "two_trainings": machine, "two_trainings_beside_actors": with_actors,
           "step_time_s": got["steps"], "train_worker_threads_cpu_s": got["threads"],
           "top_processes_serial": got["top"][1], "top_processes_concurrent": got["top"][2]}
    note = (f"training steps {phases['training_ratio']:.2f} (at most {raw['training_ceiling']:.2f}: Ray's "
            f"other processes used {beside[2]['background_cores']:.2f} cores beside the two trainings), the "
            f"rest (start-up, evaluation, teardown) {phases['rest_ratio']:.2f}: P5 lies between them at any "
            f"trial length; CPU-bound ceiling {bound:.2f}; two trainings at once without Ray "
            f"{machine['ratio']:.2f}, and beside {with_actors['actors']} idle Ray actors {with_actors['ratio']:.2f}")
    return Row("P5", f"serial ÷ concurrent wall, 2 Ray Tune trials of {p5_steps(settings)} steps on 2 cores",
               walls[1] / walls[2], ">=", 1.8, raw, note=note)


# ---------------------------------------------------------------- P6
def _p6_rank(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    torch.set_num_threads(1)
    from harness.config import from_dict
    from harness.engine import optimizer_state_bytes
    from harness.perf.common import synthetic_batch
    from harness.step import Shard, make_step

    sweep = from_dict(raw)
    result = {}
    with process_group(rank, world, port):
        for zero in (0, 2):
            cfg = trial_for(sweep, zero, world)
            shard = Shard(rank, world, cfg.train.batch_size // world)
            step_fn = make_step(cfg, shard, torch.device("cpu"))
            x, y = synthetic_batch(cfg)
            step_fn(shard.take(x), shard.take(y), 0)  # optimizer state exists after the first step
            result[zero] = optimizer_state_bytes(step_fn.net.engine)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def trial_for(sweep, zero: int, world: int):
    from harness.config import apply_overrides

    cfg = sweep.trial("sum", sweep.seeds[0])
    return apply_overrides(cfg, {"deepspeed.zero_stage": zero, "method.beta_kd": 0.0,
                                 "train.batch_size": 2 * world})


def p6_row(settings: Settings) -> Row:
    raw_sweep = plain(settings.sweep)
    with tempfile.TemporaryDirectory(prefix="genrep-perf-p6-") as tmp:
        out = str(Path(tmp) / "p6.json")
        mp.spawn(_p6_rank, args=(2, free_port(), raw_sweep, out), nprocs=2, join=True)
        ranks = json.loads(Path(out).read_text())
    z0 = max(r["0"] for r in ranks)
    z2 = max(r["2"] for r in ranks)
    raw = {"zero0_bytes_per_worker": [r["0"] for r in ranks],
           "zero2_bytes_per_worker": [r["2"] for r in ranks], "workers": 2}
    return Row("P6", "optimizer-state bytes per worker, ZeRO-2 ÷ ZeRO-0 (2 workers)", z2 / z0,
               "<=", 0.55, raw)


# ---------------------------------------------------------------- P7
SMOKE = ROOT / "sweeps" / "smoke.yaml"


def p7_measure() -> dict[str, Any]:
    from harness.config import load
    from harness.trial import data_root

    raw = yaml.safe_load(SMOKE.read_text())
    root = str(data_root(load(SMOKE)))  # the shared cache a real run would use
    with tempfile.TemporaryDirectory(prefix="genrep-perf-p7-") as tmp:
        path = Path(tmp) / "smoke.yaml"
        path.write_text(yaml.safe_dump({**raw, "output_dir": str(Path(tmp) / "smoke"),
                                        "data": {**raw["data"], "root": root}}))
        load_before, start = load_average(), time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", str(path), "--overwrite"],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"P7: the smoke sweep failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "load_before": load_before, "load_after": load_average(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def p7_row(settings: Settings, previous: dict[str, Any] | None) -> Row:
    """Measured now, or with --quick the last measured figure from ``<out>/perf.json``."""
    if settings.quick:
        if not previous:
            return Row("P7", "smoke sweep wall time (minutes)", float("nan"), "<=", 10.0,
                       note="not measured (--quick) and no earlier perf.json")
        return Row("P7", previous["ratio"], previous["measured"], "<=", 10.0, previous["raw"],
                   note=f"last measured {previous['raw'].get('measured_at', '?')} (--quick)")
    raw = p7_measure()
    return Row("P7", "smoke sweep wall time (minutes)", raw["wall_s"] / 60, "<=", 10.0, raw)
