"""P2dp: what gradient alignment costs under data parallelism, measured on 2 real gloo workers.

``genrep`` needs the Gram matrix of the *global* task gradients (harness.step.global_gram): per
step each rank reduce-scatters the two task gradients and all-reduces 4·S floats, and keeps a
[2, D] task-gradient buffer plus the padded copy the reduce-scatter reads. This section measures
that, against ``sum``, with real DeepSpeed engines (the sweep's ZeRO stage, 2 spawned processes):

- communication: every tensor handed to a ``torch.distributed`` collective during the timed steps
  is counted (bytes of the input, per op), for ``sum`` and ``genrep`` alike, so DeepSpeed's own
  gradient reduction is in both and the difference is what the alignment adds. These are payload
  bytes; a ring all-reduce of P bytes moves ~2·P·(W−1)/W over the wire, a reduce-scatter half that;
- memory: the step's peak RSS above the RSS after set-up (fresh process pair per strategy, as in
  harness.perf.memory);
- time: median wall seconds per step of rank 0 (both ranks share the 2 cores, one thread each).
"""
from __future__ import annotations

import functools
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.perf.common import Row, Settings, free_port, median, plain, process_group, teacher_off

# the collectives DeepSpeed (deepspeed.comm.torch looks each up on torch.distributed per call)
# and the harness use; the first tensor argument (or ``input``/``tensor``) is the payload
COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter_tensor", "_reduce_scatter_base",
               "reduce_scatter", "all_gather_into_tensor", "_all_gather_base", "all_gather",
               "broadcast", "all_to_all_single")
PAYLOAD_ARG = {"reduce_scatter_tensor": 1, "_reduce_scatter_base": 1, "all_gather_into_tensor": 1,
               "_all_gather_base": 1, "reduce_scatter": 1, "all_gather": 1, "all_to_all_single": 1}
PAYLOAD_KWARGS = ("input", "input_tensor", "tensor", "input_list", "input_tensor_list")


def payload_bytes(value: Any) -> int:
    """Bytes of a tensor, or of a list of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


class CollectiveCounter:
    """Counts calls and payload bytes of ``torch.distributed`` collectives while active."""

    def __init__(self):
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.active = False
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name: str, fn):
        index = PAYLOAD_ARG.get(name, 0)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active:
                value = args[index] if len(args) > index else next(
                    (kwargs[k] for k in PAYLOAD_KWARGS if kwargs.get(k) is not None), None)
                self.calls[name] += 1
                self.bytes[name] += payload_bytes(value)
            return fn(*args, **kwargs)

        return counted


def collective_seconds(d: int, world: int, reps: int = 8) -> dict[str, float]:
    """Median wall seconds of the alignment's reduce-scatter of the padded [2, D] task gradients
    (two calls, with ``harness.step.global_gram``'s padding) and, for scale, of one all-reduce of
    the same [2, D] buffer: what the backend actually charges for each (gloo, unlike NCCL, may
    not make a reduce-scatter cheaper than an all-reduce)."""
    m = -(-d // world)
    buf, mine = torch.randn(2, m * world), torch.empty(2, m)

    def timed(fn) -> float:
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return median(times)

    def scatter():
        for task in range(2):
            dist.reduce_scatter_tensor(mine[task], buf[task])

    return {"reduce_scatter_pair_s": timed(scatter), "all_reduce_pair_s": timed(lambda: dist.all_reduce(buf))}


def _rank(rank: int, world: int, port: int, raw: dict, strategy: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    from harness.config import apply_overrides, from_dict
    from harness.perf.common import synthetic_batch
    from harness.perf.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
    from harness.step import Shard, make_step

    sweep = from_dict(raw)
    cfg = apply_overrides(sweep.trial(strategy, sweep.seeds[0]), teacher_off())
    counter = CollectiveCounter()
    counter.install()
    with process_group(rank, world, port):
        shard = Shard(rank, world, cfg.train.batch_size // world)
        step_fn = make_step(cfg, shard, torch.device("cpu"))
        x, y = synthetic_batch(cfg)
        x, y = shard.take(x), shard.take(y)
        setup = current_rss_mb()
        reset = reset_peak_rss()  # the peak of the steps, not of the imports (harness.perf.memory)
        for step in range(2):  # warm-up: optimizer state, buffers, DeepSpeed's first-step work
            step_fn(x, y, step)
        times = []
        counter.active = True
        for step in range(2, 2 + steps):
            dist.barrier()
            start = time.perf_counter()
            step_fn(x, y, step)
            times.append(time.perf_counter() - start)
        counter.active = False
        peak = peak_rss_mb(reset)  # before the collective timing's own buffers
        d = sum(p.numel() for p in step_fn.shared)
        result = {"median_s": median(times), "peak_rss_mb": peak, "setup_rss_mb": setup,
                  "bytes_per_step": {k: v / steps for k, v in counter.bytes.items()},
                  "calls_per_step": {k: v / steps for k, v in counter.calls.items()},
                  "shared_params": d, "segments": len(step_fn.shared)}
        if strategy == "genrep":
            result.update(collective_seconds(d, world))
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
    counter.uninstall()
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def measure(settings: Settings, strategy: str, steps: int, world: int = 2) -> list[dict[str, Any]]:
    """One fresh process pair: per-rank timing, peak memory and collective payloads."""
    with tempfile.TemporaryDirectory(prefix="genrep-perf-dp-") as tmp:
        out = str(Path(tmp) / "dp.json")
        mp.spawn(_rank, args=(world, free_port(), plain(settings.sweep), strategy, steps, out),
                 nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def summary(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's time; the largest rank's memory and bytes (ranks send equal payloads)."""
    total = [sum(r["bytes_per_step"].values()) for r in ranks]
    return {"median_s": ranks[0]["median_s"],
            "step_peak_mb": max(r["peak_rss_mb"] - r["setup_rss_mb"] for r in ranks),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "collective_bytes_per_step": max(total),
            "bytes_by_op": ranks[0]["bytes_per_step"], "calls_by_op": ranks[0]["calls_per_step"],
            **{k: ranks[0][k] for k in ("reduce_scatter_pair_s", "all_reduce_pair_s") if k in ranks[0]}}


def expected_extra_bytes(d: int, segments: int, world: int, itemsize: int = 4) -> int:
    """Payload the alignment adds per step: 2 reduce-scatters of the padded task gradients,
    2·⌈D/W⌉·W·itemsize, and the all-reduce of the S Gram matrices, 4·S·itemsize (harness.step)."""
    return 2 * -(-d // world) * world * itemsize + 4 * segments * itemsize


def run(settings: Settings) -> list[Row]:
    steps, world = (4 if settings.quick else 16), 2
    sums = summary(measure(settings, "sum", steps, world))
    gen_ranks = measure(settings, "genrep", steps, world)
    gen = summary(gen_ranks)
    cfg = settings.sweep.trial("genrep", settings.sweep.seeds[0])
    segments = gen_ranks[0]["segments"] if cfg.strategy.granularity == "tensor" else 1
    extra = gen["collective_bytes_per_step"] - sums["collective_bytes_per_step"]
    raw = {"sum": sums, "genrep": gen, "workers": world, "zero_stage": cfg.deepspeed.zero_stage,
           "steps": steps, "shared_params": gen_ranks[0]["shared_params"],
           "extra_collective_bytes_per_step": extra,
           "expected_extra_bytes_per_step": expected_extra_bytes(gen_ranks[0]["shared_params"],
                                                                 segments, world),
           "extra_step_peak_mb": gen["step_peak_mb"] - sums["step_peak_mb"]}
    return [Row("P2dp", f"genrep step ÷ sum step, {world} gloo workers, ZeRO-{cfg.deepspeed.zero_stage} "
                        f"(extra collective payload {extra / 2**20:.2f} MiB/step, extra step peak "
                        f"{raw['extra_step_peak_mb']:+.0f} MiB)",
                gen["median_s"] / sums["median_s"], "info", float("nan"), raw,
                note="what the alignment costs under data parallelism; no target")]
