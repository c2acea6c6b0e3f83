"""P2dp: what gradient alignment costs under data parallelism, ``genrep`` against ``sum`` on 2
real gloo workers (the sweep's ZeRO stage, a fresh process pair per strategy). ``genrep`` needs
the *global* task gradients' Gram matrix: each step a rank reduce-scatters both task gradients
and all-reduces 4·S floats. Every tensor handed to a collective in the timed steps is counted
for both, so DeepSpeed's own reduction cancels (payload bytes: a ring all-reduce of P bytes moves
~2·P·(W−1)/W). Memory: common.peak_of; time: rank 0's median step.
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from harness.config import apply_overrides, from_dict
from harness.perf.common import (TEACHERS, Row, Settings, median, peak_of, spawn_ranks,
                                 synthetic_batch)

# the collectives DeepSpeed (deepspeed.comm.torch looks each up on torch.distributed at each
# call) and the harness use, with the position of the payload argument where it is not the first
COLLECTIVES = {"all_reduce": 0, "reduce": 0, "broadcast": 0, "reduce_scatter_tensor": 1,
               "_reduce_scatter_base": 1, "reduce_scatter": 1, "all_gather_into_tensor": 1,
               "_all_gather_base": 1, "all_gather": 1, "all_to_all_single": 1}
PAYLOAD_KWARGS = ("input", "input_tensor", "tensor", "input_list", "input_tensor_list")


def payload_bytes(value: Any) -> int:  # bytes of a tensor, or of a list of tensors
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(payload_bytes(v) for v in value) if isinstance(value, (list, tuple)) else 0


class CollectiveCounter:
    """Counts the payload bytes of ``torch.distributed`` collectives while ``active`` (installed
    for the rest of the process: each P2dp rank is a process of its own)."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.active = False
        for name, index in COLLECTIVES.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, index, getattr(dist, name)))

    def _wrap(self, name: str, index: int, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active:
                value = args[index] if len(args) > index else next(
                    (kwargs[k] for k in PAYLOAD_KWARGS if kwargs.get(k) is not None), None)
                self.bytes[name] += payload_bytes(value)
            return fn(*args, **kwargs)

        return counted


def _rank(rank: int, world: int, raw: dict, strategy: str, steps: int) -> dict[str, Any]:
    """One rank of the pair: 2 warm-up steps, then ``steps`` timed and counted ones."""
    from harness.step import Shard, make_step

    sweep = from_dict(raw)
    cfg = apply_overrides(sweep.trial(strategy, sweep.seeds[0]), TEACHERS["off"])
    counter, times = CollectiveCounter(), []
    shard = Shard(rank, world, cfg.train.batch_size // world)
    step_fn = make_step(cfg, shard, torch.device("cpu"))
    x, y = (shard.take(t) for t in synthetic_batch(cfg))

    def run():
        for step in range(2):  # warm-up: optimizer state, buffers, DeepSpeed's first-step work
            step_fn(x, y, step)
        counter.active = True
        for step in range(2, 2 + steps):
            dist.barrier()
            start = time.perf_counter()
            step_fn(x, y, step)
            times.append(time.perf_counter() - start)
        counter.active = False

    return {**peak_of(run), "median_s": median(times), "bytes_per_step": {k: v / steps for k, v in
            counter.bytes.items()}, "shared_params": sum(p.numel() for p in step_fn.shared),
            "segments": len(step_fn.shared)}


def summary(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's time; the largest rank's memory and bytes (ranks send equal payloads)."""
    return {"median_s": ranks[0]["median_s"], "bytes_by_op": ranks[0]["bytes_per_step"],
            **{k: max(r[k] for r in ranks) for k in ("step_peak_mb", "peak_rss_mb")},
            "collective_bytes_per_step": max(sum(r["bytes_per_step"].values()) for r in ranks)}


def expected_extra_bytes(d: int, tensors: int, world: int, itemsize: int = 4, gram_itemsize: int = 8) -> int:
    """Payload the alignment adds per step: 2 reduce-scatters of the padded task gradients,
    2·⌈D/W⌉·W·itemsize, the all-reduce of the whole-vector Gram, 4·8 (float64 Grams), and that of
    the S per-tensor Grams (telemetry on every arm, the rule's own Grams at tensor granularity),
    4·S·8 (harness.parallel.global_grams)."""
    return 2 * -(-d // world) * world * itemsize + 4 * gram_itemsize + 4 * tensors * gram_itemsize


def run(settings: Settings) -> list[Row]:
    steps, world, raw_sweep = (4 if settings.quick else 16), 2, settings.sweep.plain()
    sums = summary(spawn_ranks(_rank, world, raw_sweep, "sum", steps))
    ranks = spawn_ranks(_rank, world, raw_sweep, "genrep", steps)
    gen, d = summary(ranks), ranks[0]["shared_params"]
    cfg = settings.sweep.trial("genrep", settings.sweep.seeds[0])
    extra, extra_mb = (gen[k] - sums[k] for k in ("collective_bytes_per_step", "step_peak_mb"))
    raw = {"sum": sums, "genrep": gen, "workers": world, "zero_stage": cfg.deepspeed.zero_stage,
           "steps": steps, "shared_params": d, "extra_collective_bytes_per_step": extra,
           "expected_extra_bytes_per_step": expected_extra_bytes(d, ranks[0]["segments"], world),
           "extra_step_peak_mb": extra_mb}
    return [Row("P2dp", f"genrep step ÷ sum step, {world} gloo workers, ZeRO-{cfg.deepspeed.zero_stage} "
                        f"(extra collective payload {extra / 2**20:.2f} MiB/step, extra step peak "
                        f"{extra_mb:+.0f} MiB)", gen["median_s"] / sums["median_s"], "info",
                float("nan"), raw, note="what the alignment costs under data parallelism; no target")]
