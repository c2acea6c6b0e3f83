"""The perf table, written atomically as perf.md (also printed), perf.csv and perf.json."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from harness.atomic import write_text
from harness.perf.common import Row

COLUMNS = ("id", "ratio", "measured", "target", "pass", "raw", "note")


def fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else "nan"


def key_raw(raw: dict[str, Any]) -> str:
    """The raw numbers a reader needs to check the ratio (medians and the like), on one line."""
    parts = []
    for k, v in raw.items():
        if isinstance(v, dict) and "median_s" in v:
            mem = f", peak {v['peak_rss_mb']:.0f} MiB (+{v['step_peak_mb']:.0f})" if "peak_rss_mb" in v else ""
            parts.append(f"{k} {1000 * v['median_s']:.1f} ms/step{mem}")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{k}={fmt(float(v))}")
    return "; ".join(parts)


def table_rows(rows: list[Row]) -> list[dict[str, str]]:
    verdict = {True: "pass", False: "FAIL", None: "—"}
    return [{"id": r.id, "ratio": r.what, "measured": fmt(float(r.measured)), "target": r.target_text,
             "pass": verdict[r.passed], "raw": key_raw(r.raw), "note": r.note} for r in rows]


def meta_line(meta: dict[str, Any]) -> str:
    env, sections = meta["environment"], meta.get("section_seconds", {})
    vers = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    sections = ", ".join(f"{k} {v:.0f} s" for k, v in sections.items())
    return (f"{env['date']} on {env['cpu_model']} ({env['cpus']} CPUs), torch threads "
            f"{env['torch_threads']} (interop {env['torch_interop_threads']}); {vers}.  \n"
            f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}; "
            f"{'--quick' if meta['quick'] else 'full'} run, {meta['repeats']} rounds, "
            f"{meta['seconds']:.0f} s ({sections}).")


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = ["# genrep-bench perf", "", meta_line(meta), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c].replace("|", "/") for c in COLUMNS) + " |" for r in table_rows(rows)]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows({**t, "measured": repr(float(r.measured)), "raw": json.dumps(r.raw, default=str)}
                for r, t in zip(rows, table_rows(rows)))
    return buf.getvalue()


def write_all(out: Path, rows: list[Row], meta: dict[str, Any]) -> dict[str, Path]:
    blob = {"meta": meta, "rows": [r.as_dict() for r in rows]}
    return {"perf.csv": write_text(out / "perf.csv", csv_text(rows)),
            "perf.md": write_text(out / "perf.md", markdown(rows, meta)),
            "perf.json": write_text(out / "perf.json", json.dumps(blob, indent=2, default=str))}
