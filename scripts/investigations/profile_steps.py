"""Investigation behind docs/performance.md, P1/P2: where does the time of a step ratio that
misses its target go? (Was ``genrep-bench perf --profile``.)

What it measured: torch.profiler tables (self CPU time, the top ``rows`` operators) of ``steps``
steps of each named configuration of ``harness.perf.steps.step_configs`` (bare, sum_off,
genrep_off, pcgrad_off, sum_kd, ...; ``sum_off_keep`` is the harness step with ZeRO-1 kept on one
rank), each after 2 x ``steps`` of warm-up, in one gloo group with one torch thread.

Conclusion (2026-12-01): ZeRO-1 on one rank cost ≈ 9 ms a step in DeepSpeed's partition
bookkeeping: copying gradients into the fp32 flat partition and back (``aten::copy_`` 55 vs 29 ms
per 8 steps), averaging them (``aten::div``), flattening (``aten::cat``) and the gradient norm it
takes every step: O(parameters), buying nothing on one rank. The harness now runs ZeRO stage 0
on one data-parallel rank (``harness.engine.zero_stage``; ``deepspeed.zero_on_one_rank: true``
keeps the stage): P1 1.066 -> 1.022 (zero_on_one_rank.py measures the ratio of both).

    .venv/bin/python scripts/investigations/profile_steps.py [names=bare,sum_off,genrep_off,pcgrad_off] [sweep] > profile.txt
"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from harness.config import load
from harness.perf.common import TEACHERS, Settings, process_group, synthetic_batch, trial
from harness.perf.steps import build, step_configs


def profile_table(fn, x, y, steps: int, rows: int) -> str:
    for step in range(2 * steps):  # warm-up
        fn(x, y, step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(2 * steps, 3 * steps):
            fn(x, y, step)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(steps: int = 8, rows: int = 30) -> None:
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["bare", "sum_off", "genrep_off", "pcgrad_off"]
    settings = Settings(sweep=load(sys.argv[2] if len(sys.argv) > 2 else "sweeps/smoke.yaml").config)
    torch.set_num_threads(settings.threads)
    configs = step_configs(settings)
    configs["sum_off_keep"] = ("harness", trial(settings, "sum", **TEACHERS["off"],
                                                **{"deepspeed.zero_on_one_rank": True}))
    with process_group():
        for name in names:
            kind, cfg = configs[name]
            table = profile_table(build(kind, cfg), *synthetic_batch(cfg), steps, rows)
            print(f"===== {name}: {steps} steps\n{table}")


if __name__ == "__main__":
    main()
