"""Results as one long-format table: one row per trial × logged step × metric.

Schema (fixed): trial, strategy, seed, step, split, metric, value, stderr, higher_is_better,
status, error, config_hash, git_sha, versions, config (JSON), and ``cfg.*`` columns for the main
config fields. ``higher_is_better`` comes from the metric registry (``harness.metrics``);
``stderr`` from a reported ``"<metric>_stderr"`` beside the metric, else NaN. Files are written
atomically (``harness.atomic``); a reader rejects a truncated or foreign file with an error naming
it.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from harness import atomic
from harness.metrics import METRICS, direction, stderr_of

KEYS = ("trial", "strategy", "seed", "step", "split")
COLUMNS = (*KEYS, "metric", "value", "stderr", "higher_is_better", "status", "error",
           "config_hash", "git_sha", "versions", "config")
NOT_METRICS = {"step", "split", "done", "timestamp", "training_iteration", "time_this_iter_s",
               "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
               "iterations_since_restore", "checkpoint_dir_name", "checkpoint_path", "date",
               "trial_id", "experiment_id", "experiment_tag", "should_checkpoint"}
CONFIG_COLUMNS = ("strategy.granularity", "train.steps", "train.batch_size", "train.lr",
                  "method.beta_kd", "method.mc.k", "deepspeed.zero_stage", "resources.workers",
                  "data.source", "model.preset")


class ResultsError(ValueError):
    """An unreadable results file; the message names it."""


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "deepspeed", "diffusers", "ray", "webdataset", "optuna", "genrep-bench"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return json.dumps(out, sort_keys=True)


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return None if tree == {} else tree


def number(value: Any) -> float | None:
    """A reported value as a float; None for text, flags, None, NaN and anything not a number."""
    if isinstance(value, (str, bool)) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def is_stderr(key: str, rep: dict[str, Any]) -> bool:
    """``<metric>_stderr`` of a metric in this report or in the registry (``mc_stderr``, whose
    "mc" is neither, is a metric of its own)."""
    base = stderr_of(key)
    return base is not None and (base in rep or base in METRICS)


def long_rows(history: Iterable[dict[str, Any]], trial: dict[str, Any]) -> list[dict[str, Any]]:
    """Melt reported rows (one dict per report) into long rows carrying the trial's fields.

    Tune's history table is the union of all reports, so a metric a report did not carry shows
    up as NaN: NaN values are dropped as "not reported" (a non-finite *loss* never gets here:
    the step raises ``NonFiniteLoss`` and the trial is recorded as failed). A report's
    ``"<metric>_stderr"`` fills that metric's ``stderr`` column and is no row of its own.
    """
    rows = []
    for rep in history:
        if isinstance(rep.get("step"), float) and math.isnan(rep["step"]):
            continue
        for metric, raw in rep.items():
            value = number(raw)
            if metric in NOT_METRICS or value is None or is_stderr(metric, rep):
                continue
            stderr = number(rep.get(metric + "_stderr"))
            rows.append({**trial, "step": int(rep["step"]), "split": str(rep.get("split", "train")),
                         "metric": metric, "value": value,
                         "stderr": float("nan") if stderr is None else stderr,
                         "higher_is_better": direction(metric)})
    return rows


def error_text(error: BaseException | None, limit: int = 2000) -> str:
    """A trial's error for the results table: ``Type: message``, terminal colours removed. A long
    one keeps its head and its tail: Ray wraps a worker's exception in its traceback, and the root
    cause (``NonFiniteLoss: step 2: ...``) is the last line."""
    if error is None:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(error).__name__}: {error}").strip()
    if len(text) <= limit:
        return text
    half = (limit - 7) // 2
    return f"{text[:half]} [...] {text[-half:]}"


def trial_fields(cfg: dict[str, Any], name: str, config_hash: str, status: str, error: str,
                 sha: str, vers: str) -> dict[str, Any]:
    # `strategy` holds the trial's label (a named variant such as sum_kd, else the strategy) so
    # reports group by it; the strategy actually run stays in the config JSON
    label = cfg.get("variant") or cfg["strategy"]["name"]
    base = {"trial": name, "strategy": label, "variant": label, "seed": int(cfg["seed"]),
            "status": status, "error": error, "config_hash": config_hash, "git_sha": sha,
            "versions": vers, "config": json.dumps(cfg, sort_keys=True, default=str)}
    return base | {f"cfg.{c}": lookup(cfg, c) for c in CONFIG_COLUMNS}


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The table, rows in a fixed order (trial, step, split, metric): the same results give the
    same file whatever order Tune finished or resumed the trials in."""
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=list(COLUMNS))
    else:
        df = df.sort_values(["trial", "step", "split", "metric"], kind="stable", ignore_index=True)
    df["higher_is_better"] = df["higher_is_better"].astype("boolean")
    for c in CONFIG_COLUMNS:
        if f"cfg.{c}" in df:
            df[f"cfg.{c}"] = df[f"cfg.{c}"].astype(str)
    return df


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """The table as parquet, written atomically (``harness.atomic``): the old file or the new."""
    with atomic.atomic_open(path, "wb") as f:
        df.to_parquet(f, index=False)
    return Path(path)


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results table; a truncated or foreign file is a ResultsError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.parquet"
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError:
        raise ResultsError(f"{path}: no results file (has the sweep run?)") from None
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ResultsError(f"{path}: unreadable results file ({type(e).__name__}: {e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ResultsError(f"{path}: not a genrep-bench results table; missing columns {missing}")
    return df
