"""What every perf measurement shares: settings, rows, the machine, configs, processes, timing.

Timing (docs/performance.md, *Method*): every configuration is built and warmed up first, then
timed in *interleaved* rounds (A, B, C, B, C, A, ...), so a burst of load from elsewhere hits
every configuration alike; the figure is the median over rounds of a block's per-step time.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch
import torch.distributed as dist

from harness.config import McConfig, SweepConfig, TrialConfig, apply_overrides
from harness.ports import free_port  # noqa: F401 (perf's spawners and tests use it from here)

IDS = ("P1", "P2", "P2dp", "P3", "P3b", "P3c", "P4", "P5", "P6", "P7", "P8")


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
    p5_steps: int = 120  # each P5 trial's length: the smoke sweep's (--quick: 20)
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
        return bool((self.measured <= self.target if self.op == "<=" else self.measured >= self.target)
                    and self.extra_ok)

    @property
    def target_text(self) -> str:
        return "—" if self.op == "info" else f"{'≤' if self.op == '<=' else '≥'} {self.target:g}"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ratio": self.what, "measured": self.measured, "target": self.target_text,
                "op": self.op, "target_value": self.target, "extra_ok": self.extra_ok,
                "pass": self.passed, "raw": self.raw, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":  # the inverse of as_dict (perf.json rows)
        return cls(d["id"], d["ratio"], float(d["measured"]), d["op"], float(d["target_value"]),
                   d.get("raw", {}), d.get("note", ""), d.get("extra_ok", True))


# ---------------------------------------------------------------- the machine
def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def environment() -> dict[str, Any]:
    """Versions, threads, CPU: what a reader needs to compare two perf runs."""
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"versions": {p: version(p) for p in ("torch", "deepspeed", "ray", "diffusers", "webdataset")},
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_model": cpu, "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# ---------------------------------------------------------------- configs
def trial(settings: Settings, strategy: str = "sum", **overrides: Any) -> TrialConfig:
    """The sweep's trial for ``strategy`` (first seed) with dotted-path ``overrides``."""
    return apply_overrides(settings.sweep.trial(strategy, settings.sweep.seeds[0]), overrides)


# the distillation teacher, as trial overrides: off; the shipped default (β = 1 and every
# McConfig default, τ's refits at their steady-state gap: P3 times them apart, steps.py);
# full (K = 8 draws on every class, every step, whole batch: B·K·C forwards)
TEACHERS = {"off": {"method.beta_kd": 0.0},
            "kd": {"method.beta_kd": 1.0, "method.mc": McConfig(calibrate_first=McConfig().calibrate_every)},
            "full": {"method.beta_kd": 1.0,
                     "method.mc": McConfig(k=8, every=1, subset=1.0, prune_k=None, prune_keep=None)}}
# semantic-driven generation (P8), as trial overrides: the spatial mean correction and the t-conditioned
# variance factor from the semantic network's x_sem map (of x̂_0, the default train_source), and
# per-position representation alignment at weight 0.5
SEMANTIC = {"method.semantic.enabled": True, "method.semantic.rep_align": 0.5}


def synthetic_batch(cfg: TrialConfig, n: int | None = None):
    """``n`` (x, y) of the trial's shape (a batch): a step's cost does not depend on pixel values."""
    m, g, n = cfg.model_config(), torch.Generator().manual_seed(0), n or cfg.train.batch_size
    x = torch.rand((n, m.channels, m.image_size, m.image_size), generator=g) * 2 - 1
    return x, torch.randint(0, m.num_classes, (n,), generator=g)


# ---------------------------------------------------------------- processes
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
    from harness.engine import destroy_process_group, prepare_environment

    prepare_environment()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.barrier()
        destroy_process_group()  # also removes DeepSpeed's 67 MB shm workspace (docs/reliability.md)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _gathered_rank(rank: int, fn: Callable, world: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)  # as a Train worker with cpus_per_worker 0.99
    with process_group(rank, world, port):
        gathered = [None] * world
        dist.all_gather_object(gathered, fn(rank, world, *args))
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` fresh spawned processes sharing one gloo group:
    each rank's (JSON-able) result, in rank order. ``fn`` must be a module-level function."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="genrep-perf-") as tmp:
        out = Path(tmp, "ranks.json")
        mp.spawn(_gathered_rank, args=(fn, world, free_port(), str(out), args), nprocs=world, join=True)
        return json.loads(out.read_text())


def status_mb(field: str) -> float:
    """A figure of /proc/self/status (VmRSS, VmHWM) in MiB (the kernel reports KiB)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return next((int(x.split()[1]) / 1024 for x in lines if x.startswith(field + ":")), float("nan"))


def peak_of(run: Callable[[], Any]) -> dict[str, Any]:
    """RSS before ``run()`` (``setup_rss_mb``: imports, model, engine, optimizer) and its peak
    during it, in a process of its own: peak RSS only grows and freed heap pages stay resident,
    so configurations run in one process would hide each other's peaks.

    ``echo 5 > /proc/self/clear_refs`` (Linux ≥ 4.0) resets the high-water mark VmHWM to the
    current RSS first: set-up's own peak (1,069 MiB here, against ~0.47 GiB once built) was every
    configuration's ``ru_maxrss``, which is the fallback (``peak_reset`` False) where it fails."""
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    setup = status_mb("VmRSS")
    run()
    peak = status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"setup_rss_mb": setup, "peak_rss_mb": peak, "step_peak_mb": peak - setup, "peak_reset": reset}


# ---------------------------------------------------------------- timing
@dataclass
class Timed:
    """A step ``fn(x, y, step)``, its batch, its steps per block, and each timed block's s/step."""

    fn: Callable[[torch.Tensor, torch.Tensor, int], Any]
    x: torch.Tensor
    y: torch.Tensor
    block: int = 1
    step: int = 0
    wall: list[float] = field(default_factory=list)

    def run_block(self, timed: bool = True) -> None:
        start = time.perf_counter()
        for _ in range(self.block):
            self.fn(self.x, self.y, self.step)
            self.step += 1
        if timed:
            self.wall.append((time.perf_counter() - start) / self.block)


def time_interleaved(configs: dict[str, Timed], repeats: int, warmup: int) -> dict[str, Timed]:
    """``warmup`` untimed blocks of each configuration, then ``repeats`` timed rounds of one block
    each, in an order rotated every round (no position bias; see the module docstring)."""
    names = list(configs)
    for name in names:
        for _ in range(warmup):
            configs[name].run_block(timed=False)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()  # a collection due now is not charged to whichever block comes next
            configs[name].run_block()
    return configs


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Ratio of medians (the reported figure) and the spread of the per-round paired ratios."""
    paired = sorted(a / b for a, b in zip(num, den))
    return {"ratio_of_medians": median(num) / median(den), "paired_median": median(paired),
            "paired_min": paired[0], "paired_max": paired[-1]}


def timing_raw(t: Timed) -> dict[str, float]:
    return {"median_s": median(t.wall), "min_s": min(t.wall), "max_s": max(t.wall), "rounds": len(t.wall)}
