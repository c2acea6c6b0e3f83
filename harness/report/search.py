"""Searched-parameter tables: trials, best configuration, Pareto front, importance proxy.

A parameter is "searched" when it is listed in a trial config's ``params`` dict (dotted keys,
e.g. ``strategy.options.damping``) or when a config field (from the ``config`` JSON, or a
``cfg.*`` column) takes more than one value among the trials of one (sweep, strategy): seeds
and the strategy name are the grid's own axes and never count.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from harness.metrics import direction
from harness.report.stats import pareto_front
from harness.report.tables import held_out_split, ok_rows

# the report's search objectives (accuracy, generation quality, cost) → maximise? (registry);
# the Pareto front takes one cost: the teacher's forwards per step (mc_evals, deterministic) when
# the trials differ in it, else the measured seconds per step (step_time)
OBJECTIVES = {m: direction(m) for m in ("head_acc", "fd_ref", "mc_evals", "step_time")}
COSTS = ("mc_evals", "step_time")
PARETO = "head_acc ↑, fd_ref ↓ and one cost ↓ (mc_evals when it varies, else step_time)"
NOT_PARAMS = {"seed", "strategy.name", "name", "output_dir", "source_file"}
KEYS = ["sweep", "trial", "strategy", "seed", "status"]
EMPTY = ("trials", "best", "pareto", "importance")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists become their JSON text (hashable, comparable)."""
    if not isinstance(tree, dict):
        return {prefix: json.dumps(tree) if isinstance(tree, (list, tuple)) else tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def trial_config(row: pd.Series) -> tuple[dict[str, Any], set[str]]:
    """One trial's flattened config (cfg.* columns, then the JSON) and its explicit params."""
    cfg = {c[4:]: row[c] for c in row.index if c.startswith("cfg.")}
    try:
        tree = json.loads(row["config"]) if isinstance(row["config"], str) else {}
    except json.JSONDecodeError:
        tree = {}
    params = flatten(tree.pop("params", None) or {}) if isinstance(tree, dict) else {}
    cfg.update(flatten(tree) if isinstance(tree, dict) else {})
    return cfg | params, set(params)


def searched_params(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (sweep, trial) of a searched (sweep, strategy) group: KEYS + the searched
    parameters' values; attrs["params"] names them. Plain grid groups are left out."""
    first = df.drop_duplicates(["sweep", "trial"])
    configs = [trial_config(r) for _, r in first.iterrows()]
    table = pd.DataFrame([c for c, _ in configs], index=first.index)
    has_params = pd.Series([bool(p) for _, p in configs], index=first.index, dtype=bool)
    groups = [first["sweep"], first["strategy"]]
    varies = {c: table[c].map(str).groupby(groups).transform("nunique") > 1
              for c in table.columns if c not in NOT_PARAMS}
    varying = [c for c, v in varies.items() if v.any()]
    params = sorted(set().union(*(p for _, p in configs)) | set(varying)) if configs else []
    searched = has_params.groupby(groups).transform("any")
    for c in varying:
        searched |= varies[c]
    out = pd.concat([first[KEYS], table[params]], axis=1)[searched].reset_index(drop=True)
    out.attrs["params"] = params
    return out


def objectives(df: pd.DataFrame) -> pd.DataFrame:
    """Per (sweep, trial): val head_acc and fd_ref (last held-out step), mean train step_time and
    mc_evals (teacher forwards per step)."""
    rows = ok_rows(df)
    split = "val" if (rows["split"] == "val").any() else held_out_split(rows)
    held = rows[(rows["split"] == split) & rows["metric"].isin(["head_acc", "fd_ref"])]
    held = held[held["step"] == held.groupby(["sweep", "trial"])["step"].transform("max")]
    train = rows[(rows["split"] == "train") & rows["metric"].isin(list(COSTS))]
    both = pd.concat([held, train])
    return both.pivot_table(index=["sweep", "trial"], columns="metric", values="value",
                            aggfunc="mean").reset_index()


def importance(trials: pd.DataFrame, params: list[str], target: str = "head_acc") -> pd.DataFrame:
    """A correlation proxy, NOT optuna's fANOVA importance (the table keeps no study):
    numeric parameters score |Spearman ρ| with the target, categorical ones the correlation ratio
    η = √(SS_between / SS_total); ``share`` normalises the scores to sum to 1."""
    ok = trials.dropna(subset=[target]) if target in trials else trials.iloc[0:0]
    rows = []
    for p in params:
        sub = ok[ok[p].notna()]
        x, y = sub[p], sub[target]
        if x.map(str).nunique() < 2 or y.nunique() < 2:
            continue
        num = pd.to_numeric(x, errors="coerce")
        if num.notna().all():
            score, method = abs(np.corrcoef(num.rank(), y.rank())[0, 1]), "|spearman rho|"
        else:
            means = y.groupby(x.map(str)).transform("mean")
            score = float(np.sqrt(((means - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum()))
            method = "correlation ratio eta"
        rows.append({"param": p, "score": float(score), "method": method, "trials": len(sub)})
    out = pd.DataFrame(rows, columns=["param", "score", "method", "trials"])
    total = out["score"].sum()
    out["share"] = out["score"] / total if total > 0 else np.nan
    return out.sort_values("score", ascending=False, ignore_index=True)


def best_config(trials: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """Configurations (strategy + params) ranked by mean val head_acc over their seeds; top row."""
    ok = trials[trials["status"] == "ok"].dropna(subset=["head_acc"])
    if ok.empty:
        return pd.DataFrame()
    cols = [c for c in OBJECTIVES if c in ok]
    keys = ["strategy", *params]
    grouped = ok.assign(**{p: ok[p].map(str) for p in params}).groupby(keys, dropna=False)
    agg = grouped[cols].mean().join(grouped.size().rename("n")).reset_index()
    return agg.sort_values("head_acc", ascending=False, ignore_index=True).head(1)


def pareto_columns(trials: pd.DataFrame) -> list[str]:
    """The objectives the front is taken over: head_acc, fd_ref and the first of ``COSTS`` whose
    value differs between the trials (the teacher's forwards when the search moved them; a cost
    that is the same everywhere cannot trade off), else step_time; columns with no value dropped."""
    present = [c for c in OBJECTIVES if c in trials and trials[c].notna().any()]
    costs = [c for c in COSTS if c in present]
    varying = [c for c in costs if trials[c].dropna().nunique() > 1]
    cost = (varying or costs[-1:])[:1]
    return [c for c in present if c not in COSTS] + cost


def search_table(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{"trials", "best", "pareto", "importance"} DataFrames; all empty when nothing was searched.

    Pareto: the trials not dominated over head_acc ↑, fd_ref ↓ and one cost ↓ (``pareto_columns``),
    objectives missing from the results left out.
    """
    empty = {k: pd.DataFrame() for k in EMPTY}
    if df.empty:
        return empty
    trials = searched_params(df)
    params = trials.attrs["params"]
    if not params:
        return empty
    trials = trials.merge(objectives(df), on=["sweep", "trial"], how="left")
    trials.attrs["params"] = params
    cols = pareto_columns(trials)
    mask = pareto_front(trials[cols].to_numpy(float), [OBJECTIVES[c] for c in cols]) if cols else []
    pareto = trials[np.asarray(mask, dtype=bool)] if cols else trials.iloc[0:0]
    return {"trials": trials, "best": best_config(trials, params),
            "pareto": pareto.sort_values(cols[0], ascending=not OBJECTIVES[cols[0]]) if cols else pareto,
            "importance": importance(trials, params)}
