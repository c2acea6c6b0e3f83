"""The perf table on screen and in files: ``perf.csv``, ``perf.md``, ``perf.json``, each atomic."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from harness.perf.common import Row

COLUMNS = ("id", "ratio", "measured", "target", "pass", "raw", "note")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, dict):
        return "; ".join(f"{k}={fmt(x)}" for k, x in v.items() if not isinstance(x, (dict, list)))
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "—"}[passed]


def key_raw(raw: dict[str, Any]) -> str:
    """The raw numbers a reader needs to check the ratio: medians and the like, one line."""
    parts = []
    for k, v in raw.items():
        if isinstance(v, dict) and "median_s" in v:
            mem = f", peak {v['peak_rss_mb']:.0f} MiB (+{v['step_peak_mb']:.0f})" if "peak_rss_mb" in v else ""
            cpu = f" (cpu {1000 * v['cpu_median_s']:.1f})" if "cpu_median_s" in v else ""
            parts.append(f"{k} {1000 * v['median_s']:.1f} ms/step{cpu}{mem}")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{k}={fmt(float(v))}")
    return "; ".join(parts)


def table_rows(rows: list[Row]) -> list[dict[str, str]]:
    return [{"id": r.id, "ratio": r.what, "measured": fmt(float(r.measured)), "target":
             "—" if r.op == "info" else f"{'≤' if r.op == '<=' else '≥'} {r.target:g}",
             "pass": verdict(r.passed), "raw": key_raw(r.raw), "note": r.note} for r in rows]


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = ["# genrep-bench perf", "", meta_lines(meta), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in table_rows(rows):
        lines.append("| " + " | ".join(r[c].replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def meta_lines(meta: dict[str, Any]) -> str:
    env = meta["environment"]
    vers = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (f"{env['date']} on {env['cpu_model']} ({env['cpus']} CPUs), torch threads "
            f"{env['torch_threads']} (interop {env['torch_interop_threads']}); {vers}.  \n"
            f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}; "
            f"{'--quick' if meta['quick'] else 'full'} run, {meta['repeats']} rounds, "
            f"{meta['seconds']:.0f} s ({sections(meta)}).")


def sections(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v['seconds']:.0f} s, load {v['load_start'][0]:g}→{v['load_end'][0]:g}"
                     for k, v in meta.get("section_seconds", {}).items())


def plain_text(rows: list[Row], meta: dict[str, Any]) -> str:
    table = table_rows(rows)
    cols = ("id", "ratio", "measured", "target", "pass")
    width = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols}
    out = [meta_lines(meta).replace("  \n", "\n"), "",
           "  ".join(c.ljust(width[c]) for c in cols)]
    for r in table:
        out.append("  ".join(r[c].ljust(width[c]) for c in cols))
        if r["raw"]:
            out.append("      " + r["raw"])
        if r["note"]:
            out.append("      note: " + r["note"])
    return "\n".join(out)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r, t in zip(rows, table_rows(rows)):
        w.writerow({**t, "measured": repr(float(r.measured)), "raw": json.dumps(r.raw, default=str)})
    return buf.getvalue()


def write_all(out: Path, rows: list[Row], meta: dict[str, Any]) -> dict[str, Path]:
    paths = {name: out / name for name in ("perf.csv", "perf.md", "perf.json")}
    write_atomic(paths["perf.csv"], csv_text(rows))
    write_atomic(paths["perf.md"], markdown(rows, meta))
    blob = {"meta": meta, "rows": [r.as_dict() for r in rows]}
    write_atomic(paths["perf.json"], json.dumps(blob, indent=2, default=str, allow_nan=True))
    return paths
