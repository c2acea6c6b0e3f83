"""``genrep-bench perf``: the harness's cost against its targets (docs/performance.md): ``common``
(settings, rows, processes, memory, timing), ``steps`` P1-P3 and P8, ``dataparallel`` P2dp, ``mc`` P3b,
``system`` P4-P7, ``output`` the table. Investigations behind the doc: scripts/investigations/."""
from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from harness.perf.common import IDS, Row, Settings, environment, load_average
from harness.perf.output import markdown, write_all

__all__ = ["IDS", "Row", "Settings", "keep_others", "markdown", "run_perf", "write_all"]


def keep_others(out: Path, rows: list[Row], meta: dict[str, Any]) -> list[Row]:
    """``--update``: this run's rows plus the rows of ``<out>/perf.json`` it did not measure,
    each noted with the date it was measured (ids perf no longer has are dropped), in IDS order."""
    try:
        earlier = json.loads((out / "perf.json").read_text())
    except (OSError, ValueError):
        return rows
    measured = {r.id for r in rows}
    date = earlier.get("meta", {}).get("environment", {}).get("date", "an earlier run")
    kept = [Row.from_dict(d) for d in earlier.get("rows", []) if d["id"] in IDS and d["id"] not in measured]
    for row in (r for r in kept if "kept from" not in r.note):
        row.note = f"{row.note}; kept from the run of {date}".lstrip("; ")
    meta["kept_from"] = {"date": date, "ids": sorted({r.id for r in kept})}
    return sorted(rows + kept, key=lambda r: IDS.index(r.id))


def guarded(row_id: str, fn: Callable[[], list[Row]], seconds: dict[str, float]) -> list[Row]:
    """A section that fails becomes a row saying so; the other sections still run (wall s kept)."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table, and the exit code is 1
        logging.getLogger("harness").error("perf %s failed:\n%s", row_id, traceback.format_exc())
        return [Row(row_id, "(failed)", float("nan"), "<=", float("nan"),
                    note=f"error: {type(e).__name__}: {e}"[:500])]
    finally:
        seconds[row_id] = round(time.perf_counter() - start, 1)


def run_perf(settings: Settings) -> tuple[list[Row], dict[str, Any]]:
    """Every requested row, the timing-sensitive ones first; P7 (minutes) is not run by --quick."""
    from harness.perf import dataparallel, mc, steps, system

    torch.set_num_threads(settings.threads)
    ids, shared, sections, rows, start = set(settings.ids), {}, {}, [], time.perf_counter()
    meta = {"environment": environment(), "load_start": load_average(), "quick": settings.quick,
            "repeats": settings.repeats, "warmup_blocks": settings.warmup, "ids": sorted(ids),
            "sweep": settings.sweep.source_file}

    def step_section():
        found, info = steps.run(settings)
        shared.update(info)  # P4 divides by the step's images/s
        return [r for r in found if r.id in ids]

    for row_id, wanted, fn in [
            ("P1", ids & {"P1", "P2", "P3", "P4", "P8"}, step_section),
            ("P4", "P4" in ids, lambda: [system.p4_row(settings, shared)] if shared else []),
            ("P2dp", "P2dp" in ids, lambda: dataparallel.run(settings)),
            ("P6", "P6" in ids, lambda: [system.p6_row(settings)]),
            ("P3b", ids & {"P3b", "P3c"}, lambda: [r for r in mc.run(settings) if r.id in ids]),
            ("P5", "P5" in ids, lambda: [system.p5_row(settings)]),
            ("P7", "P7" in ids and not settings.quick, lambda: [system.p7_row()])]:
        if wanted:
            rows += guarded(row_id, fn, sections)
    rows.sort(key=lambda r: IDS.index(r.id))
    meta.update(load_end=load_average(), seconds=time.perf_counter() - start, section_seconds=sections)
    return rows, meta
