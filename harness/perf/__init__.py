"""``genrep-bench perf``: the harness's cost, measured against its targets in one run.

| id | ratio | target |
|---|---|---|
| P1 | harness training step ÷ bare PyTorch loop | ≤ 1.05 |
| P2 | genrep / pcgrad step ÷ sum step | ≤ 1.10 |
| P2dp | genrep ÷ sum step on 2 gloo workers; extra collective bytes and step memory | info |
| P3 | step with the default MC teacher ÷ teacher off (full K=8 beside it, peak memory of each) | ≤ 1.5 |
| P3b | MC zero-shot evaluations per image, pruned ÷ full, at equal top-1 | ≤ 0.5 |
| P3acc | distilled head top-1, default teacher − full teacher (points) | ≥ −1 |
| P4 | loader images/s ÷ training step images/s | ≥ 10 |
| P5 | serial ÷ concurrent wall, 2 Ray Tune trials on 2 cores | ≥ 1.8 |
| P6 | optimizer-state bytes per worker, ZeRO-2 ÷ ZeRO-0 | ≤ 0.55 |
| P7 | smoke sweep wall time (minutes) | ≤ 10 |

Modules: ``common`` (settings, rows, machine, interleaved timing), ``steps`` (P1-P3),
``dataparallel`` (P2dp),
``memory`` (peak RSS per configuration in fresh subprocesses), ``mc`` (P3b, P3acc),
``system`` (P4-P7), ``output`` (table and files). See docs/performance.md.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from harness.perf.common import IDS, Row, Settings, environment, load_average
from harness.perf.output import plain_text, write_all

log = logging.getLogger("harness")
__all__ = ["IDS", "Row", "Settings", "run_perf", "plain_text", "write_all"]


def previous_row(out: Path, row_id: str) -> dict[str, Any] | None:
    try:
        rows = json.loads((out / "perf.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    return next((r for r in rows if r["id"] == row_id and r["measured"] == r["measured"]), None)


def keep_others(out: Path, rows: list[Row], meta: dict[str, Any]) -> list[Row]:
    """``--update``: this run's rows plus the rows of ``<out>/perf.json`` it did not measure,
    each noted with the date it was measured; the table stays in IDS order."""
    try:
        earlier = json.loads((out / "perf.json").read_text())
    except (OSError, ValueError):
        return rows
    measured = {r.id for r in rows}
    date = earlier.get("meta", {}).get("environment", {}).get("date", "an earlier run")
    kept = []
    for d in earlier.get("rows", []):
        if d["id"] in measured:
            continue
        row = Row.from_dict(d)
        if "kept from" not in row.note:
            row.note = f"{row.note}; kept from the run of {date}".lstrip("; ")
        kept.append(row)
    meta["kept_from"] = {"date": date, "ids": sorted({r.id for r in kept})}
    order = {k: i for i, k in enumerate(IDS)}
    return sorted(rows + kept, key=lambda r: order.get(r.id, len(order)))


def guarded(row_id: str, fn: Callable[[], list[Row]], seconds: dict[str, dict]) -> list[Row]:
    """A section that fails becomes a row saying so; the other sections still run. Each
    section's wall time and the load average (1/5/15 min) at its start and end are kept."""
    start, load = time.perf_counter(), load_average()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table, and the exit code is 1
        log.error("perf %s failed:\n%s", row_id, traceback.format_exc())
        return [Row(row_id, "(failed)", float("nan"), "<=", float("nan"),
                    note=f"error: {type(e).__name__}: {e}"[:500])]
    finally:
        seconds[row_id] = {"seconds": round(time.perf_counter() - start, 1), "load_start": load,
                           "load_end": load_average()}


def run_perf(settings: Settings) -> tuple[list[Row], dict[str, Any]]:
    """Every requested measurement, in an order that keeps the timing-sensitive ones first."""
    from harness.perf import dataparallel, mc, steps, system

    torch.set_num_threads(settings.threads)
    out, ids = Path(settings.out), set(settings.ids)
    previous_p7 = previous_row(out, "P7")
    meta = {"environment": environment(), "load_start": load_average(), "quick": settings.quick,
            "repeats": settings.repeats, "warmup_blocks": settings.warmup, "ids": sorted(ids),
            "sweep": settings.sweep.source_file}
    start, rows, shared, sections = time.perf_counter(), [], {}, {}

    def step_section():
        found, info = steps.run(settings)
        shared.update(info)
        return [r for r in found if r.id in ids]

    if ids & {"P1", "P2", "P3", "P4"}:
        rows += guarded("P1", step_section, sections)
    if "P4" in ids and shared:
        rows += guarded("P4", lambda: [system.p4_row(settings, shared)], sections)
    if "P2dp" in ids:
        rows += guarded("P2dp", lambda: dataparallel.run(settings), sections)
    if "P6" in ids:
        rows += guarded("P6", lambda: [system.p6_row(settings)], sections)
    if ids & {"P3b", "P3acc"}:
        rows += guarded("P3b", lambda: mc.run(settings), sections)
    if "P5" in ids:
        rows += guarded("P5", lambda: [system.p5_row(settings)], sections)
    if "P7" in ids:
        rows += guarded("P7", lambda: [system.p7_row(settings, previous_p7)], sections)
    order = {k: i for i, k in enumerate(IDS)}
    rows.sort(key=lambda r: order.get(r.id, len(order)))
    meta.update(load_end=load_average(), seconds=time.perf_counter() - start, section_seconds=sections)
    return rows, meta
