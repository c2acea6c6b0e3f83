"""Investigation behind docs/performance.md, P2dp: what does gloo charge for the alignment's
reduce-scatter of the two task gradients, against one all-reduce of the same buffer?

What it measured: on 2 spawned gloo ranks (harness.perf.common.spawn_ranks), the median wall
seconds of two ``reduce_scatter_tensor`` calls over a [2, D] buffer padded to a multiple of the
world size (the padding ``harness.step``'s global Gram matrix uses), and of one ``all_reduce`` of
the same buffer. On NCCL a reduce-scatter is the native half of an all-reduce; on gloo it may not
be cheaper.

Conclusion (2026-12-01, D = 1,063,905 shared parameters of ``digits16``, medians of 8): the two
reduce-scatters took 11.0 ms where one all-reduce took 8.0 ms (14.7 vs 9.3 ms on the AMD machine
of 2026-11-30): on CPU clusters the alignment's traffic costs what an all-reduce of both task
gradients costs.

    .venv/bin/python scripts/investigations/gloo_reduce_scatter.py [D=1063905] [reps=8]
"""
from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from harness.perf.common import median, spawn_ranks


def collective_seconds(rank: int, world: int, d: int, reps: int) -> dict[str, float]:
    m = -(-d // world)  # each rank's slice of the padded buffer
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


if __name__ == "__main__":
    d = int(sys.argv[1]) if len(sys.argv) > 1 else 1_063_905
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    got = spawn_ranks(collective_seconds, 2, d, reps)[0]
    print(f"D = {d:,}: two reduce-scatters {1000 * got['reduce_scatter_pair_s']:.1f} ms, "
          f"one all-reduce {1000 * got['all_reduce_pair_s']:.1f} ms (rank 0, median of {reps})")
