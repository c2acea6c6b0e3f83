"""Investigation behind docs/performance.md, P1: what does ZeRO cost on a single data-parallel
rank, where it has nothing to partition?

What it measured: P1's method (harness.perf.common: warm-up, then interleaved rounds, the ratio of
median step times with the paired per-round spread) for three configurations of the sweep's
``sum`` trial with the teacher off: the bare PyTorch loop, the harness step as it runs now on one
rank (ZeRO stage 0 whatever ``deepspeed.zero_stage`` says) and the harness step with the sweep's
stage kept (``deepspeed.zero_on_one_rank: true``).

Conclusion (2026-12-01, 2-core Intel Xeon, ZeRO-1 in the sweep): kept 1.054 (1.066 in the full
run of that day, paired rounds 1.02-1.13, over P1's 1.05), stage 0 1.022, with the same
parameters to 1e-6 (tests/harness/test_worker.py) and 65 MiB less RSS (590 vs 655 MiB
peak). ZeRO's partition bookkeeping is O(parameters) per step (profile_steps.py) and partitions
nothing on one rank, so one rank runs stage 0; trials with several workers keep their stage.

    .venv/bin/python scripts/investigations/zero_on_one_rank.py [repeats=7] [sweep]
"""
from __future__ import annotations

import sys

import torch

from harness.config import load
from harness.perf.common import (TEACHERS, Settings, Timed, process_group, ratio_stats,
                                 synthetic_batch, time_interleaved, trial)
from harness.perf.steps import block_of, build


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    settings = Settings(sweep=load(sys.argv[2] if len(sys.argv) > 2 else "sweeps/smoke.yaml").config)
    torch.set_num_threads(settings.threads)
    base = trial(settings, "sum", **TEACHERS["off"])
    configs = {"bare": ("bare", base), "stage0": ("harness", base),
               "kept": ("harness", trial(settings, "sum", **TEACHERS["off"],
                                         **{"deepspeed.zero_on_one_rank": True}))}
    with process_group():
        timed = {n: Timed(build(kind, cfg), *synthetic_batch(cfg), block_of(cfg))
                 for n, (kind, cfg) in configs.items()}
        time_interleaved(timed, repeats, settings.warmup)
    for name in ("stage0", "kept"):
        s = ratio_stats(timed[name].wall, timed["bare"].wall)
        print(f"harness sum step ({name}, ZeRO-{base.deepspeed.zero_stage} in the sweep) / bare loop: "
              f"{s['ratio_of_medians']:.3f} (paired rounds {s['paired_min']:.3f}-{s['paired_max']:.3f})")


if __name__ == "__main__":
    main()
