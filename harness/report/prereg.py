"""Pre-registered comparisons and the held-out curve's mean level (docs/evaluation.md,
"Pre-registered statistics").

The sweep's ``preregistration`` section travels in every result row's config JSON
(``harness.sweep.trial_rows``), so these tables are pure functions of the results: for each
(comparison arm, primary metric) the paired Δ against the baseline over seeds, its two-sided
paired t p-value, Holm's adjustment over the whole family, the run's minimum detectable effect,
TOST's (1 − 2α) interval and p against the margin, and one verdict word (``stats.VERDICTS``).
"""
from __future__ import annotations

import json
import math

import pandas as pd

from harness.config import ConfigError, PreregistrationConfig, preregistration_from_dict
from harness.report.stats import (curve_mean, holm, mde_paired, mean_ci, paired_delta,
                                  paired_t_test, t_quantile, tost_interval, tost_paired, verdict)
from harness.report.tables import (UNIT, direction, final_values, held_out_split, labelled, ok_rows,
                                   pm)

PREREG_COLUMNS = ["arm", "metric", "higher_is_better", "n", "n_registered", "delta", "ci95", "p",
                  "p_holm", "mde", "tost_lo", "tost_hi", "p_tost", "margin", "verdict"]


def preregistration(df: pd.DataFrame) -> tuple[PreregistrationConfig | None, str | None]:
    """The pre-registration the results' trials carry, and a note when none can be applied
    (several different ones in the loaded sweeps, or one that does not parse)."""
    if df.empty or "config" not in df:
        return None, None
    found = {}
    for sweep, text in df.drop_duplicates(["sweep", "trial"])[["sweep", "config"]].itertuples(index=False):
        raw = json.loads(text).get("preregistration") if isinstance(text, str) else None
        if raw:
            found.setdefault(json.dumps(raw, sort_keys=True), set()).add(sweep)
    if not found:
        return None, None
    if len(found) > 1:
        sweeps = sorted(set().union(*found.values()))
        return None, (f"The results hold {len(found)} different pre-registrations (sweeps "
                      f"{', '.join(sweeps)}): none is applied; report each sweep on its own.")
    try:
        return preregistration_from_dict(json.loads(next(iter(found)))), None
    except ConfigError as e:
        return None, f"The results' pre-registration does not parse ({e}): none is applied."


def paired(values: pd.Series, arm: str, baseline: str) -> pd.DataFrame:
    """Per shared (sweep, seed): the arm's value and the baseline's (columns ``arm``, ``base``)."""
    names = set(values.index.get_level_values("strategy")) if len(values) else set()
    if arm not in names or baseline not in names:
        return pd.DataFrame(columns=["arm", "base"])
    both = pd.concat([values.xs(arm, level="strategy").rename("arm"),
                      values.xs(baseline, level="strategy").rename("base")], axis=1, join="inner")
    return both.dropna()


def compare(d: list[float], alpha: float, power: float, margin: float | None) -> dict[str, float]:
    """Δ statistics of one comparison: mean, 95% half-width, paired t p, MDE, TOST's (1 − 2α)
    interval and its p against ±margin (NaN without a margin)."""
    t = paired_t_test(d)
    n, sd = t["n"], t["sd"]
    half = t_quantile(n - 1, 0.975) * sd / math.sqrt(n) if n > 1 else float("nan")
    lo, hi = tost_interval(t["mean"], sd, n, alpha)
    return {"n": n, "delta": t["mean"], "ci95": half, "p": t["p"], "sd": sd,
            "mde": mde_paired(sd, n, alpha, power), "tost_lo": lo, "tost_hi": hi,
            "p_tost": tost_paired(d, margin)}


def prereg_table(df: pd.DataFrame, p: PreregistrationConfig) -> pd.DataFrame:
    """One row per (comparison arm, primary metric): Δ = arm − baseline over the paired seeds,
    p, Holm-adjusted p over every row (the family: all pre-registered comparisons), MDE at
    ``p.power``, TOST's (1 − 2α) interval, the margin and the verdict."""
    if df.empty:
        return pd.DataFrame(columns=PREREG_COLUMNS)
    split = held_out_split(df)
    rows = []
    for m in p.primary:
        values = final_values(df, m, split)
        for arm in p.comparisons:
            both = paired(values, arm, p.baseline)
            stats = compare((both["arm"] - both["base"]).tolist(), p.alpha, p.power, p.margins[m])
            rows.append({"arm": arm, "metric": m, "higher_is_better": direction(df, m),
                         "n_registered": p.seeds, "margin": float(p.margins[m]), **stats})
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p"].tolist())
    table["verdict"] = [verdict(r.delta, r.p_holm, r.p_tost, r.higher_is_better, p.alpha)
                        for r in table.itertuples()]
    order = {a: i for i, a in enumerate(p.comparisons)}
    table = table.sort_values("arm", key=lambda s: s.map(order), kind="stable")
    return table[PREREG_COLUMNS].reset_index(drop=True)


AUC_NOTE = ("Each trial's held-out curve (evaluations every eval.every steps, from the untrained "
            "network at step 0 to the end) reduced to its mean level: the trapezoidal area under "
            "metric(step) divided by the step range, in the metric's units; mean ± 95% t half-width "
            "over seeds, and the paired Δ of the mean level against the baseline (descriptive: "
            "outside the pre-registered family).")


def note(p: PreregistrationConfig) -> str:
    """What was registered and how each column is computed, for the report."""
    level = round(100 * (1 - 2 * p.alpha))
    margins = ", ".join(f"{m} ±{p.margins[m]:g}" for m in p.primary)
    return (f"Registered before the run (stored with every trial): primary metrics "
            f"{', '.join(p.primary)}; baseline {p.baseline}; comparisons {', '.join(p.comparisons)}; "
            f"{p.seeds} paired seeds; α = {p.alpha:g}; margins {margins}. Δ = arm − baseline at each "
            f"trial's last held-out evaluation, paired on seeds, mean ± 95% t half-width; p: two-sided "
            f"paired t; p (Holm): Holm's step-down adjustment over all {len(p.comparisons) * len(p.primary)} "
            f"pre-registered comparisons; MDE: the true Δ this run would detect with power {p.power:g} "
            f"given the spread of its seeds (exact paired t power, noncentral t; unadjusted α); "
            f"{level}% CI: the (1 − 2α) t interval of TOST. Verdict: better/worse when p (Holm) < α "
            f"(sign read through the metric's direction), else equivalent within the margin when "
            f"TOST rejects both one-sided nulls at α (the {level}% CI inside ±margin), else inconclusive.")


def pvalue(p: float) -> str:
    """"0.012", "<0.001", "1.000"; "—" without a test."""
    if p is None or math.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def interval(lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "—"
    return f"[{lo:+.3g}, {hi:+.3g}]"


def format_prereg(table: pd.DataFrame, p: PreregistrationConfig) -> pd.DataFrame:
    """Strings: one line per comparison × metric, the verdict last."""
    level = round(100 * (1 - 2 * p.alpha))
    out = pd.DataFrame([{
        "comparison": f"{r.arm} − {p.baseline}", "metric": labelled(r.metric),
        "n": f"{r.n}" + ("" if r.n == r.n_registered else f" ({r.n_registered} registered)"),
        "Δ ± 95% CI": pm(r.delta, r.ci95, signed=True), "p": pvalue(r.p), "p (Holm)": pvalue(r.p_holm),
        f"MDE (power {p.power:g})": f"{r.mde:.3g}" if not math.isnan(r.mde) else "—",
        f"{level}% CI (TOST)": interval(r.tost_lo, r.tost_hi), "margin": f"±{r.margin:g}",
        "verdict": r.verdict} for r in table.itertuples()])
    return out.set_index("comparison") if len(out) else out


# ---------------------------------------------------------------- the curve's mean level
def curve_values(df: pd.DataFrame, metric: str, split: str) -> pd.Series:
    """Per (strategy, sweep, seed): each trial's held-out curve reduced to its mean level
    (:func:`stats.curve_mean`: trapezoid over the evaluated steps ÷ the step range), trials
    averaged; NaN where a trial has fewer than two evaluations."""
    rows = ok_rows(df)
    rows = rows[(rows["split"] == split) & (rows["metric"] == metric)]
    if rows.empty:
        return pd.Series(dtype=float)
    per_trial = rows.groupby(["strategy", *UNIT, "trial"]).apply(
        lambda g: curve_mean(g["step"].tolist(), g["value"].tolist()), include_groups=False)
    return per_trial.groupby(["strategy", *UNIT]).mean()


def auc_table(df: pd.DataFrame, p: PreregistrationConfig) -> pd.DataFrame:
    """Per arm × primary metric: the end value and the curve's mean level (mean ± 95% CI over
    seeds), and the paired Δ of the mean level against the baseline. Empty when no trial was
    evaluated at two steps or more (``eval.every: 0``)."""
    cols = ["arm", "metric", "n", "end", "end_ci", "auc", "auc_ci", "delta_auc", "delta_auc_ci"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    split, rows = held_out_split(df), []
    for m in p.primary:
        end, auc = final_values(df, m, split), curve_values(df, m, split).dropna()
        for arm in (p.baseline, *p.comparisons):
            if arm not in set(auc.index.get_level_values("strategy")):
                continue
            e_mean, e_ci, _ = mean_ci(end.xs(arm, level="strategy").tolist())
            a_mean, a_ci, n = mean_ci(auc.xs(arm, level="strategy").tolist())
            both = paired(auc, arm, p.baseline)
            d, d_ci, _ = (paired_delta(both["arm"].tolist(), both["base"].tolist())
                          if arm != p.baseline and len(both) else (math.nan,) * 3)
            rows.append({"arm": arm, "metric": m, "n": n, "end": e_mean, "end_ci": e_ci, "auc": a_mean,
                         "auc_ci": a_ci, "delta_auc": d, "delta_auc_ci": d_ci})
    return pd.DataFrame(rows, columns=cols)


def format_auc(table: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Strings per arm: for each primary metric its end value, mean level and Δ mean level."""
    cells: dict[str, dict[str, str]] = {}
    for r in table.itertuples():
        c = cells.setdefault(r.arm, {"n": str(r.n)})
        c[f"{labelled(r.metric)} end"] = pm(r.end, r.end_ci)
        c[f"{r.metric} mean level"] = pm(r.auc, r.auc_ci)
        c[f"{r.metric} Δ mean level"] = ("(baseline)" if r.arm == baseline
                                         else pm(r.delta_auc, r.delta_auc_ci, signed=True))
    out = pd.DataFrame.from_dict(cells, orient="index")
    out.index.name = "arm"
    return out.fillna("—")
