"""Tables from the long-format results: means ± 95% CI over seeds, paired Δ, conflict telemetry.

Every function takes the concatenated results (``load``) and returns a tidy numeric DataFrame;
``format_table`` turns the main table into strings ("0.912 ± 0.012") for Markdown/HTML/text.
Units of replication are seeds: a (sweep, strategy, seed) with several trials (a search) is
averaged first, and Δ pairs a strategy with the baseline on the same (sweep, seed).
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from harness import metrics as registry
from harness.results import read_results
from harness.report.stats import mean_ci, paired_delta

# the registry's held-out objectives, and the per-step costs with how a trial's rows reduce
QUALITY = registry.held_out()
# the Monte Carlo teacher's own held-out quality, beside the head's (its top-1 is mc_acc)
TEACHER = ("mc_acc", *(n for n, m in registry.METRICS.items() if m.kind == "teacher"
                       and n.startswith("teacher_")))
COST = registry.costs()
UNIT = ["sweep", "seed"]  # what pairs two strategies' runs


def load(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate one or several sweeps' results, with a ``sweep`` column (directory name)."""
    frames = []
    for p in paths:
        p = Path(p)
        df = read_results(p)
        frames.append(df.assign(sweep=p.name if p.is_dir() or not p.suffix else p.parent.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if len(df) else df


def strategies(df: pd.DataFrame, baseline: str = "sum") -> list[str]:
    """Baseline first, then the known strategies (the rules, then the standalone modes such as
    ``separate``: ``harness.modes``), then the rest (named variants) alphabetically."""
    from harness.modes import known_strategies  # imports torch: only when a report is made

    names = set(df["strategy"].dropna()) if len(df) else set()
    rank = {s: i for i, s in enumerate(dict.fromkeys((baseline, *known_strategies())))}
    return sorted(names, key=lambda s: (rank.get(s, len(rank)), s))


def direction(df: pd.DataFrame, metric: str) -> bool | None:
    """higher_is_better from the rows (first non-null), else the registry (``harness.metrics``)."""
    col = df.loc[df["metric"] == metric, "higher_is_better"].dropna()
    return bool(col.iloc[0]) if len(col) else registry.direction(metric)


def held_out_split(df: pd.DataFrame) -> str:
    """"test" when the results hold test rows, else "val"."""
    return "test" if (df["split"] == "test").any() else "val"


def final_values(df: pd.DataFrame, metric: str, split: str) -> pd.Series:
    """Per (strategy, sweep, seed): the metric at each trial's last held-out step, trials averaged."""
    rows = ok_rows(df)
    rows = rows[(rows["split"] == split) & (rows["metric"] == metric)]
    last = rows[rows["step"] == rows.groupby("trial")["step"].transform("max")]
    return last.groupby(["strategy", *UNIT])["value"].mean()


def cost_values(df: pd.DataFrame, metric: str) -> pd.Series:
    """Per (strategy, sweep, seed): each trial's train rows reduced by COST[metric] ("last": the
    row of its last step, for a running total such as images_per_s), then averaged."""
    rows = ok_rows(df)
    rows = rows[(rows["split"] == "train") & (rows["metric"] == metric)].sort_values("step", kind="stable")
    per_trial = rows.groupby(["strategy", *UNIT, "trial"])["value"].agg(COST[metric])
    return per_trial.groupby(["strategy", *UNIT]).mean()


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """The CLI's per-strategy summary of one sweep: the held-out metrics of each trial's last
    evaluation on the reporting split (test when the results have it, else val; evaluations
    during training are left out), and the mean training cost, each a mean over the strategy's
    trials (seeds)."""
    if df.empty:
        return pd.DataFrame()
    ok = df[df["status"] == "ok"]
    split, wanted = held_out_split(df), list(QUALITY)
    one_sweep = df if "sweep" in df else df.assign(sweep="")  # final_values pairs on (sweep, seed)
    final = pd.DataFrame({m: final_values(one_sweep, m, split).groupby("strategy").mean()
                          for m in wanted if (df["metric"] == m).any()})
    train = ok[ok["split"] == "train"]
    cost = train[train["metric"].isin(["step_time", "conflict", "cos"])].pivot_table(
        index="strategy", columns="metric", values="value", aggfunc="mean")
    seeds = df.groupby("strategy")["seed"].nunique().rename("seeds")
    status = df.groupby("strategy")["status"].agg(lambda s: ",".join(sorted(set(s)))).rename("status")
    out = pd.concat([seeds, status, final, cost], axis=1)
    return out[[c for c in ["seeds", "status", *wanted, "step_time", "cos", "conflict"] if c in out]]


def summarise(values: pd.Series, order: Sequence[str], baseline: str) -> list[dict]:
    """mean ± CI per strategy and the paired Δ against ``baseline`` on shared (sweep, seed)."""
    out = []
    base = values.xs(baseline, level="strategy") if baseline in values.index.get_level_values(0) else None
    for s in order:
        if s not in values.index.get_level_values(0):
            continue
        own = values.xs(s, level="strategy")
        mean, ci, n = mean_ci(own.tolist())
        d = (float("nan"), float("nan"), 0)
        if base is not None and s != baseline:
            both = pd.concat([own, base], axis=1, join="inner").dropna()
            d = paired_delta(both.iloc[:, 0].tolist(), both.iloc[:, 1].tolist())
        out.append({"strategy": s, "mean": mean, "ci": ci, "n": n,
                    "delta": d[0], "delta_ci": d[1], "delta_n": d[2]})
    return out


def mark_best(table: pd.DataFrame) -> pd.Series:
    """True where a strategy's mean is the best of its metric column (ties all marked; none for a
    metric without a direction). Column-wise transforms: a groupby-apply returned a frame, not a
    mask, when the table had a single metric."""
    if table.empty:
        return pd.Series(False, index=table.index)
    by = table.groupby("metric")["mean"]
    up = table["higher_is_better"].map(lambda v: v is True or v == True)  # noqa: E712 (numpy bools)
    directed = table["higher_is_better"].notna()
    target = by.transform("max").where(up, by.transform("min"))
    return (table["mean"] == target) & directed & table["mean"].notna()


def main_table(df: pd.DataFrame, metrics: Sequence[str] | None = None, baseline: str = "sum",
               split: str | None = None) -> pd.DataFrame:
    """Tidy table: strategy × metric → mean, ci (95% t half-width), n, delta, delta_ci, best.

    Quality metrics are the final held-out values (``split``: default test if present, else
    val); cost metrics come from the train rows (mean step_time, images/s and MC evaluations per
    step, peak rss_mb), one value per seed each. Δ = paired mean over shared seeds of
    (strategy − baseline), with its own t interval; NaN for the baseline itself.
    """
    cols = ["strategy", "metric", "kind", "higher_is_better", "mean", "ci", "n", "delta",
            "delta_ci", "delta_n", "best"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    split = split or held_out_split(df)
    present = set(ok_rows(df)["metric"])
    quality = [m for m in (metrics or QUALITY) if m in present and m not in COST]
    order = strategies(df, baseline)
    rows = []
    for kind, names, get in (("quality", quality, lambda m: final_values(df, m, split)),
                             ("cost", [m for m in COST if m in present], lambda m: cost_values(df, m))):
        for m in names:
            for r in summarise(get(m), order, baseline):
                rows.append({**r, "metric": m, "kind": kind, "higher_is_better": direction(df, m)})
    table = pd.DataFrame(rows, columns=cols[:-1])
    if table.empty:
        return pd.DataFrame(columns=cols)
    table["best"] = mark_best(table).reindex(table.index).fillna(False).astype(bool)
    table = table[cols]
    table.attrs["baseline"] = baseline
    return table


def decimals(ci: float, mean: float = 0.0) -> int:
    """Decimals that show the CI to 2 significant figures, in [0, 6]; when the CI is zero (to
    rounding: identical seeds), enough for 4 significant figures of the mean."""
    if ci is None or math.isnan(ci) or ci <= 1e-9 * max(1.0, abs(mean)):
        ref = abs(mean) if mean and not math.isnan(mean) else 1.0
        return int(min(6, max(0, 3 - math.floor(math.log10(ref)))))
    return int(min(6, max(0, 1 - math.floor(math.log10(ci)))))


def pm(mean: float, ci: float, signed: bool = False) -> str:
    """"0.912 ± 0.012"; the mean alone (4 significant figures) when there is no interval."""
    if mean is None or math.isnan(mean):
        return "—"
    sign = "+" if signed else ""
    if ci is None or math.isnan(ci):
        return f"{mean:{sign}.4g}"
    k = decimals(ci, mean)
    return f"{mean:{sign}.{k}f} ± {abs(ci):.{k}f}"


def arrow(hib) -> str:
    return "" if hib is None or pd.isna(hib) else (" ↑" if hib else " ↓")


def labelled(metric: str) -> str:
    """The metric's name with its registered direction: "head_acc ↑", "cos"."""
    return metric + arrow(registry.direction(metric))


def column_label(metric: str, hib) -> str:
    """"head_acc ↑"; a cost column names its unit and a peak or a whole-run value: "rss_mb (MiB,
    peak) ↓", "images_per_s (images/s, whole run) ↑"."""
    m = registry.lookup(metric)
    if m is None or m.kind != "cost" or not m.unit:
        return metric + arrow(hib)
    how = {"max": ", peak", "last": ", whole run"}.get(m.reduce, "")
    return f"{metric} ({m.unit}{how})" + arrow(hib)


def robustness_table(df: pd.DataFrame, baseline: str = "sum") -> pd.DataFrame:
    """:func:`main_table`'s rows for head top-1 on clean held-out images and on the same images
    noised to each t of ``eval.robust_t`` (``head_acc_t<t>``), with ``sigma``, the input noise
    √(1−ᾱ_t) the results logged beside them (``noise_sigma_t<t>``; NaN where they did not)."""
    rows = ok_rows(df)
    robust = registry.robustness(rows["metric"].unique()) if len(rows) else []
    if not robust:
        return pd.DataFrame(columns=[*main_table(pd.DataFrame()).columns, "sigma"])
    table = main_table(df, metrics=["head_acc", *robust], baseline=baseline)
    table = table[table["kind"] == "quality"].reset_index(drop=True)
    sigma = {m: rows.loc[rows["metric"] == "noise_sigma_" + m.rsplit("_", 1)[1], "value"] for m in robust}
    table["sigma"] = table["metric"].map(lambda m: sigma[m].iloc[0] if len(sigma.get(m, ())) else
                                         (0.0 if m == "head_acc" else float("nan")))
    table.attrs["baseline"] = baseline
    return table


def robust_labels(table: pd.DataFrame) -> dict[str, str]:
    """Metric → column label naming its input noise: "head_acc_t50 (σ = 0.091) ↑", "head_acc
    (clean) ↑", for :func:`format_table` on a :func:`robustness_table`."""
    out = {}
    for m, sigma in table.drop_duplicates("metric")[["metric", "sigma"]].itertuples(index=False):
        noise = "clean" if m == "head_acc" else "" if math.isnan(sigma) else f"σ = {sigma:.3f}"
        out[m] = f"{m} ({noise})" if noise else m
        out[m] += arrow(registry.direction(m))
    return out


def format_table(table: pd.DataFrame, value: str = "mean", markup: str = "md",
                 labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Strings per strategy × metric: "mean ± ci" (``value="mean"``, best in bold) or the paired
    "Δ ± ci" against the baseline (``value="delta"``). ``markup``: "md", "html" or "plain";
    ``labels``: metric → column name (default :func:`column_label`)."""
    if table.empty:
        return pd.DataFrame()
    bold = {"md": "**{}**", "html": "<strong>{}</strong>", "plain": "{}"}[markup]
    esc = html.escape if markup == "html" else (lambda s: s)
    cells: dict[str, dict[str, str]] = {}
    for r in table.itertuples():
        if value == "delta":
            base = r.strategy == table.attrs.get("baseline")
            text = "(baseline)" if base else pm(r.delta, r.delta_ci, signed=True) if r.delta_n else "—"
            n_used = 0 if base else r.delta_n
        else:
            text = pm(r.mean, r.ci)
            text = bold.format(esc(text)) if r.best and markup != "plain" else esc(text)
            n_used = r.n
        if n_used and n_used != max_n(table, r.strategy):
            text += f" (n={n_used})"
        name = (labels or {}).get(r.metric) or column_label(r.metric, r.higher_is_better)
        cells.setdefault(esc(r.strategy), {})[esc(name)] = text
    out = pd.DataFrame.from_dict(cells, orient="index")
    out.insert(0, "n", [str(max_n(table, html.unescape(s))) for s in out.index])
    out.index.name = "strategy"
    return out.fillna("—")


def max_n(table: pd.DataFrame, strategy: str) -> int:
    return int(table.loc[table["strategy"] == strategy, "n"].max())


def teacher_table(df: pd.DataFrame, baseline: str = "sum") -> pd.DataFrame:
    """:func:`main_table`'s quality rows for the teacher's metrics (NLL, ECE, max-probability,
    entropy, τ in use; top-1 = mc_acc), for the arms whose evaluation logged them."""
    table = main_table(df, metrics=TEACHER, baseline=baseline)
    return table[table["kind"] == "quality"].reset_index(drop=True)


# per-tensor telemetry (genrep.strategies.telemetry.summarize): each logged row is a window mean
# of per-step values over the tensors both tasks reach
SEGMENT = ("seg_conflict", "seg_cos_p10", "seg_cos_median", "seg_cos_p90", "seg_norm_ratio_median",
           "seg_shared")


def conflict_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per strategy, from the logged train rows: fraction of steps in conflict (mean of the 0/1
    ``conflict`` telemetry; a logged row is a window mean, so this is the step-weighted
    fraction for equal windows), mean and median cos(g_p, g_g), mean damping λ applied,
    median ‖g_p‖/‖g_g‖, the update change (mean, and the mean over seeds of each run's largest
    logged value), the per-tensor telemetry's means over logged rows (the share of tensors in
    conflict, the 10th/50th/90th percentiles of the per-tensor cos, the median per-tensor norm
    ratio, the share of tensors both tasks reach), the number of logged rows, and of (sweep,
    seed) runs with telemetry."""
    whole = ("conflict", "cos", "damping", "norm_ratio", "update_change")
    cols = ["strategy", "seeds", "logged", "conflict_frac", "cos_mean", "cos_median",
            "damping_mean", "norm_ratio_median", "update_change_mean", "update_change_max",
            *SEGMENT]
    rows = ok_rows(df)
    rows = rows[rows["split"] == "train"] if len(rows) else rows
    out = []
    for s in strategies(rows):
        r = rows[rows["strategy"] == s]
        v = {m: r.loc[r["metric"] == m, "value"] for m in (*whole, *SEGMENT)}
        if all(v[m].empty for m in whole):
            continue
        logged = r[r["metric"].isin(whole)]
        change = r[r["metric"] == "update_change"].groupby(UNIT)["value"].max()
        out.append({"strategy": s, "seeds": logged[UNIT].drop_duplicates().shape[0],
                    "logged": max(len(v[m]) for m in whole),
                    "conflict_frac": v["conflict"].mean(), "cos_mean": v["cos"].mean(),
                    "cos_median": v["cos"].median(), "damping_mean": v["damping"].mean(),
                    "norm_ratio_median": v["norm_ratio"].median(),
                    "update_change_mean": v["update_change"].mean(),
                    "update_change_max": change.mean() if len(change) else float("nan"),
                    **{m: v[m].mean() for m in SEGMENT}})
    return pd.DataFrame(out, columns=cols)
