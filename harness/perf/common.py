"""What every perf measurement shares: settings, result rows, the machine's description, timing.

Timing method (STYLE.md, principle 8): every configuration of a comparison is built first, warmed
up, then timed in *interleaved* blocks (A, B, C, A, B, C, ... with the order rotated each round),
so a burst of load from other processes on this shared machine hits every configuration alike;
the reported time is the median over rounds of the per-step time within a block. A block is a
whole number of teacher periods (``mc.every`` steps), so a step time includes the teacher's
amortised cost exactly.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from harness.config import SweepConfig, TrialConfig, apply_overrides

IDS = ("P1", "P2", "P2dp", "P3", "P3b", "P3acc", "P4", "P5", "P6", "P7")


@dataclass(frozen=True)
class Settings:
    """How much to measure; ``--quick`` shrinks everything (no figure is then worth quoting)."""

    sweep: SweepConfig
    ids: tuple[str, ...] = IDS
    quick: bool = False
    repeats: int = 7  # timed rounds per configuration (median over rounds)
    warmup: int = 2  # untimed blocks per configuration before the first round
    threads: int = 1  # torch intra-op threads: the worker's own setting (cpus_per_worker 0.99 → 1)
    p3b_steps: int = 300  # training steps of the model P3b classifies with (0 = untrained)
    p3b_batch: int = 64
    p3b_images: int | None = None  # held-out images P3b scores (None: all of val + test)
    p3b_seeds: int = 3
    acc_steps: int = 40  # P3acc: fine-tuning steps per teacher setting
    # P3acc: paired seeds; a 40-step head's top-1 moves ±1 point from seed to seed, so 3 seeds
    # left the paired difference's standard error at ~0.6 points against a 1-point target
    acc_seeds: int = 5
    p5_steps: int | None = None  # each P5 trial's length (None: the smoke sweep's 120; quick 20)
    out: str = "results/perf"


@dataclass
class Row:
    """One line of the perf table: a ratio, its target and the raw numbers behind it."""

    id: str
    what: str
    measured: float
    op: str  # "<=", ">=", or "info" (shown beside another row, no target)
    target: float
    raw: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    extra_ok: bool = True  # a side condition of the target (P3b: equal top-1)

    @property
    def passed(self) -> bool | None:
        if self.op == "info" or not math.isfinite(self.measured):
            return None
        ok = self.measured <= self.target if self.op == "<=" else self.measured >= self.target
        return bool(ok and self.extra_ok)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ratio": self.what, "measured": self.measured,
                "target": "—" if self.op == "info" else f"{'≤' if self.op == '<=' else '≥'} {self.target:g}",
                "op": self.op, "target_value": self.target, "extra_ok": self.extra_ok,
                "pass": self.passed, "raw": self.raw, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        """The inverse of :meth:`as_dict` (perf.json rows)."""
        return cls(d["id"], d["ratio"], float(d["measured"]), d["op"], float(d["target_value"]),
                   d.get("raw", {}), d.get("note", ""), d.get("extra_ok", True))


# ---------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def environment() -> dict[str, Any]:
    """Versions, threads, CPU: what a reader needs to compare two perf runs."""
    from importlib.metadata import PackageNotFoundError, version

    vers = {}
    for pkg in ("torch", "deepspeed", "ray", "diffusers", "webdataset"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = None
    return {"versions": vers, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_model": cpu_model(), "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# ---------------------------------------------------------------- configs
def trial(settings: Settings, strategy: str = "sum", **overrides: Any) -> TrialConfig:
    """The sweep's trial for ``strategy`` (first seed) with dotted-path ``overrides``."""
    cfg = settings.sweep.trial(strategy, settings.sweep.seeds[0])
    return apply_overrides(cfg, overrides)


def teacher_off() -> dict[str, Any]:
    return {"method.beta_kd": 0.0}


def teacher_default() -> dict[str, Any]:
    """The shipped teacher: β = 1 and every McConfig default."""
    from harness.config import McConfig

    return {"method.beta_kd": 1.0, "method.mc": McConfig()}


def teacher_full(k: int = 8) -> dict[str, Any]:
    """Every step, whole batch, no pruning: B·K·C teacher forwards per step."""
    from harness.config import McConfig

    return {"method.beta_kd": 1.0,
            "method.mc": McConfig(k=k, every=1, subset=1.0, prune_k=None, prune_keep=None)}


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int = 0, world: int = 1, port: int | None = None):
    """A gloo group (1 process by default) for real DeepSpeed engines outside Ray; the
    environment DeepSpeed reads is set for the block only, so later Ray workers do not inherit it."""
    if dist.is_initialized():
        yield
        return
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()), RANK=str(rank),
               WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from harness.engine import prepare_environment

    prepare_environment()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        from harness.engine import destroy_process_group

        dist.barrier()
        destroy_process_group()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def synthetic_batch(cfg: TrialConfig, batch: int | None = None, seed: int = 0):
    """(x, y) of the trial's shape: a step's cost does not depend on the pixel values."""
    m = cfg.model_config()
    g = torch.Generator().manual_seed(seed)
    n = batch or cfg.train.batch_size
    x = torch.rand((n, m.channels, m.image_size, m.image_size), generator=g) * 2 - 1
    return x, torch.randint(0, m.num_classes, (n,), generator=g)


# ---------------------------------------------------------------- timing
StepFn = Callable[[torch.Tensor, torch.Tensor, int], Any]


@dataclass
class Timed:
    """A step function to time, its batch, and how many steps make one block."""

    fn: StepFn
    x: torch.Tensor
    y: torch.Tensor
    block: int = 1
    next_step: int = 0

    cpu: list[float] = field(default_factory=list)  # process CPU seconds per step, per block

    def run_block(self) -> float:
        """Wall seconds per step over one block of consecutive steps (CPU seconds kept aside)."""
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(self.block):
            self.fn(self.x, self.y, self.next_step)
            self.next_step += 1
        self.cpu.append((time.process_time() - cpu) / self.block)
        return (time.perf_counter() - start) / self.block


def time_interleaved(configs: dict[str, Timed], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Per-step wall seconds of every round for every configuration (see the module docstring).

    Each configuration's process CPU seconds per step are kept in ``Timed.cpu`` (rounds only):
    with one torch thread, CPU time is nearly blind to other processes on the machine, so it
    cross-checks a wall-clock ratio taken under load.
    """
    names = list(configs)
    for name in names:
        for _ in range(warmup):
            configs[name].run_block()
        configs[name].cpu.clear()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no position bias
        for name in order:
            gc.collect()
            times[name].append(configs[name].run_block())
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Ratio of medians (the reported figure) and the spread of the per-round paired ratios."""
    paired = sorted(a / b for a, b in zip(num, den))
    return {"ratio_of_medians": median(num) / median(den), "paired_median": median(paired),
            "paired_min": paired[0], "paired_max": paired[-1]}


def timing_raw(times: list[float], cpu: list[float] | None = None) -> dict[str, float]:
    out = {"median_s": median(times), "min_s": min(times), "max_s": max(times), "rounds": len(times)}
    return {**out, "cpu_median_s": median(cpu)} if cpu else out


def plain(sweep: SweepConfig) -> dict[str, Any]:
    """The sweep as a plain, YAML-safe mapping (no grid, variants or search), re-validatable."""
    import json
    from dataclasses import asdict

    raw = asdict(sweep)
    for key in ("grid", "variants", "search", "source_file"):
        raw.pop(key)
    return json.loads(json.dumps(raw))  # tuples → lists
