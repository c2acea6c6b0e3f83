"""Pre-registered comparisons, the controls and the held-out curve's mean level
(docs/evaluation.md, "Pre-registered statistics").

The sweep's ``preregistration`` section travels in every result row's config JSON
(``harness.sweep.trial_rows``), so these tables are pure functions of the results: for each
registered (arm, reference, metric) triple (``PreregistrationConfig.triples``: the shorthand
comparisons × primary metrics against the baseline, the explicit family, the controls) the paired
Δ over seeds, its two-sided paired t p-value, Holm's adjustment over the whole family, the MDE at
α and at α/m, TOST's (1 − 2α) interval and p against the margin, and one verdict word
(``stats.VERDICTS``); then whether the controls came out as they must (the A/A arm neither better
nor worse, the positive control worse), and a banner when one did not.
"""
from __future__ import annotations

import json
import math

import pandas as pd

from harness.config import ConfigError, PreregistrationConfig, preregistration_from_dict
from harness.power import mde_paired, t_quantile
from harness.report.stats import (curve_mean, holm, mean_ci, paired_delta, paired_t_test,
                                  tost_interval, tost_paired, verdict)
from harness.report.tables import (QUALITY, UNIT, direction, final_values, held_out_split,
                                   labelled, ok_rows, pm)

PREREG_COLUMNS = ["arm", "reference", "metric", "role", "higher_is_better", "n", "n_registered",
                  "delta", "ci95", "p", "p_holm", "mde", "mde_holm", "tost_lo", "tost_hi", "p_tost",
                  "margin", "verdict"]
ROLES = ("comparison", "A/A control", "positive control")


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


def paired(values: pd.Series, arm: str, baseline: str,
           offsets: dict[str, int] | None = None) -> pd.DataFrame:
    """Per shared (sweep, seed index): the arm's value and the baseline's (columns ``arm``,
    ``base``). An arm with a seed offset k (an A/A control) is paired by index: its seed i + k
    with the other's seed i."""
    names = set(values.index.get_level_values("strategy")) if len(values) else set()
    if arm not in names or baseline not in names:
        return pd.DataFrame(columns=["arm", "base"])

    def own(label: str) -> pd.Series:
        s, k = values.xs(label, level="strategy"), (offsets or {}).get(label, 0)
        return s.rename(index=lambda seed: seed - k, level="seed") if k else s

    both = pd.concat([own(arm).rename("arm"), own(baseline).rename("base")], axis=1, join="inner")
    return both.dropna()


def compare(d: list[float], alpha: float, power: float, margin: float | None,
            alpha_holm: float | None = None) -> dict[str, float]:
    """Δ statistics of one comparison: mean, 95% half-width, paired t p, MDE at α (and at
    ``alpha_holm``, NaN without it), TOST's (1 − 2α) interval and its p against ±margin (NaN
    without a margin)."""
    t = paired_t_test(d)
    n, sd = t["n"], t["sd"]
    half = t_quantile(n - 1, 0.975) * sd / math.sqrt(n) if n > 1 else float("nan")
    lo, hi = tost_interval(t["mean"], sd, n, alpha)
    return {"n": n, "delta": t["mean"], "ci95": half, "p": t["p"], "sd": sd,
            "mde": mde_paired(sd, n, alpha, power),
            "mde_holm": mde_paired(sd, n, alpha_holm, power) if alpha_holm else float("nan"),
            "tost_lo": lo, "tost_hi": hi, "p_tost": tost_paired(d, margin)}


def role(p: PreregistrationConfig, arm: str) -> str:
    """One of :data:`ROLES` for a triple's arm."""
    if arm == p.controls.aa:
        return "A/A control"
    return "positive control" if p.controls.positive and arm == p.controls.positive.arm else "comparison"


def prereg_table(df: pd.DataFrame, p: PreregistrationConfig) -> pd.DataFrame:
    """One row per registered triple, in the family's order: Δ = arm − reference over the paired
    seeds, p, Holm-adjusted p over every row (the family), MDE at α and at α/m with power
    ``p.power``, TOST's (1 − 2α) interval, the margin and the verdict."""
    if df.empty:
        return pd.DataFrame(columns=PREREG_COLUMNS)
    split, values, rows = held_out_split(df), {}, []
    for c in p.triples():
        if c.metric not in values:
            values[c.metric] = final_values(df, c.metric, split)
        both = paired(values[c.metric], c.arm, c.reference, p.seed_offsets)
        stats = compare((both["arm"] - both["base"]).tolist(), p.alpha, p.power,
                        p.margins[c.metric], p.alpha_first())
        rows.append({"arm": c.arm, "reference": c.reference, "metric": c.metric, "role": role(p, c.arm),
                     "higher_is_better": direction(df, c.metric), "n_registered": p.seeds,
                     "margin": float(p.margins[c.metric]), **stats})
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p"].tolist())
    table["verdict"] = [verdict(r.delta, r.p_holm, r.p_tost, r.higher_is_better, p.alpha)
                        for r in table.itertuples()]
    return table[PREREG_COLUMNS].reset_index(drop=True)


AUC_NOTE = ("Each trial's held-out curve (evaluations every eval.every steps, from the untrained "
            "network at step 0 to the end) reduced to its mean level: the trapezoidal area under "
            "metric(step) divided by the step range, in the metric's units; mean ± 95% t half-width "
            "over seeds, and the paired Δ of the mean level against the baseline (descriptive: "
            "outside the pre-registered family).")


def family_text(p: PreregistrationConfig) -> str:
    """"kd − base (head_acc), full − both (head_acc), …": the registered triples."""
    return ", ".join(f"{c.arm} − {c.reference} ({c.metric})" for c in p.triples())


def note(p: PreregistrationConfig) -> str:
    """What was registered and how each column is computed, for the report."""
    level, m = round(100 * (1 - 2 * p.alpha)), len(p.triples())
    margins = ", ".join(f"{k} ±{v:g}" for k, v in p.margins.items())
    mde = f"; sized to detect {', '.join(f'{k} {v:g}' for k, v in p.mde.items())}" if p.mde else ""
    return (f"Registered before the run (stored with every trial): the family of {m} comparisons "
            f"{family_text(p)}; {p.seeds} paired seeds; α = {p.alpha:g}; margins {margins}{mde}. "
            f"Δ = arm − reference at each trial's last held-out evaluation, paired on seeds (an arm "
            f"with a seed offset by index), mean ± 95% t half-width; p: two-sided paired t; p (Holm): "
            f"Holm's step-down adjustment over all {m} comparisons (one family); MDE: the true Δ this "
            f"run would detect with power {p.power:g} given the spread of its seeds (exact paired t "
            f"power, noncentral t), at the unadjusted α and at α/m = {p.alpha_first():.3g}, the level "
            f"Holm tests the family's first comparison at; {level}% CI: the (1 − 2α) t interval of "
            f"TOST. Verdict: better/worse when p (Holm) < α (sign read through the metric's "
            f"direction), else equivalent within the margin when TOST rejects both one-sided nulls "
            f"at α (the {level}% CI inside ±margin), else inconclusive.")


def pvalue(p: float) -> str:
    """"0.012", "<0.001", "1.000"; "—" without a test."""
    if p is None or math.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def interval(lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "—"
    return f"[{lo:+.3g}, {hi:+.3g}]"


def number(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:.3g}"


def format_prereg(table: pd.DataFrame, p: PreregistrationConfig) -> pd.DataFrame:
    """Strings: one line per registered triple, the verdict last; controls marked."""
    level = round(100 * (1 - 2 * p.alpha))
    mark = {"comparison": "", "A/A control": " [A/A]", "positive control": " [positive control]"}
    out = pd.DataFrame([{
        "comparison": f"{r.arm} − {r.reference}{mark[r.role]}", "metric": labelled(r.metric),
        "n": f"{r.n}" + ("" if r.n == r.n_registered else f" ({r.n_registered} registered)"),
        "Δ ± 95% CI": pm(r.delta, r.ci95, signed=True), "p": pvalue(r.p), "p (Holm)": pvalue(r.p_holm),
        f"MDE (α = {p.alpha:g})": number(r.mde), f"MDE (α/m = {p.alpha_first():.3g})": number(r.mde_holm),
        f"{level}% CI (TOST)": interval(r.tost_lo, r.tost_hi), "margin": f"±{r.margin:g}",
        "verdict": r.verdict} for r in table.itertuples()])
    return out.set_index("comparison") if len(out) else out


# ---------------------------------------------------------------- the controls
CONTROLS_NOTE = ("Controls, registered in the family like any comparison: the A/A arm is the "
                 "baseline's config under another label, its seed i the baseline's seed i plus a "
                 "fixed offset (paired by index), and must come out neither better nor worse; the "
                 "positive control is made worse by a known mechanism and must be called so. If "
                 "either fails, or has fewer than two paired seeds, nothing else in the run can be "
                 "trusted.")


def controls_table(table: pd.DataFrame, p: PreregistrationConfig) -> pd.DataFrame:
    """One row per registered control triple: what it must show, what it showed, passed."""
    cols = ["control", "arm", "reference", "metric", "expect", "verdict", "n", "passed"]
    rows, registered = [], table[table["role"] != "comparison"] if len(table) else table
    for r in registered.itertuples():
        if r.role == "A/A control":
            expect, passed = "neither better nor worse", r.verdict not in ("better", "worse")
        else:
            expect = p.controls.positive.expect
            passed = r.verdict == expect
        rows.append({"control": r.role, "arm": r.arm, "reference": r.reference, "metric": r.metric,
                     "expect": expect, "verdict": r.verdict, "n": r.n, "passed": passed and r.n >= 2})
    return pd.DataFrame(rows, columns=cols)


def format_controls(table: pd.DataFrame) -> pd.DataFrame:
    """Strings per control triple: must, is, n, and passed or FAILED."""
    out = pd.DataFrame([{"control": f"{r.control}: {r.arm} − {r.reference}", "metric": labelled(r.metric),
                         "must be": r.expect, "is": r.verdict, "n": str(r.n),
                         "check": "passed" if r.passed else "FAILED"} for r in table.itertuples()])
    return out.set_index("control") if len(out) else out


BANNER = "CONTROL FAILED: this run cannot be trusted"


def banner(controls: pd.DataFrame) -> list[str]:
    """The lines that open a report whose controls failed: :data:`BANNER`, then one line per
    failed control (none when they all passed)."""
    failed = controls[~controls["passed"].astype(bool)] if len(controls) else controls
    if not len(failed):
        return []
    return [BANNER, *(f"The {r.control} {r.arm} − {r.reference} on {r.metric} must be {r.expect}, "
                      f"and is {r.verdict} (n = {r.n} paired seeds)." for r in failed.itertuples())]


def aa_table(df: pd.DataFrame, p: PreregistrationConfig) -> pd.DataFrame:
    """The A/A arm against the baseline on every held-out metric in the results (paired by
    index): Δ, 95% CI, the unadjusted p and its verdict at α (exploratory: how often chance alone
    says better or worse). Empty without an A/A control."""
    cols = ["metric", "n", "delta", "ci95", "p", "verdict"]
    aa = p.controls.aa
    if df.empty or aa is None:
        return pd.DataFrame(columns=cols)
    split, rows = held_out_split(df), []
    for m in (m for m in QUALITY if (df["metric"] == m).any()):
        both = paired(final_values(df, m, split), aa, p.baseline, p.seed_offsets)
        s = compare((both["arm"] - both["base"]).tolist(), p.alpha, p.power, p.margins.get(m))
        rows.append({"metric": m, "n": s["n"], "delta": s["delta"], "ci95": s["ci95"], "p": s["p"],
                     "verdict": verdict(s["delta"], s["p"], s["p_tost"], direction(df, m), p.alpha)})
    return pd.DataFrame(rows, columns=cols)


def aa_note(table: pd.DataFrame, p: PreregistrationConfig) -> str:
    """How often the A/A arm was called better or worse across the metrics, against chance."""
    tested = table[table["n"] >= 2]
    hits = int(tested["verdict"].isin(["better", "worse"]).sum())
    return (f"The A/A arm {p.controls.aa} against {p.baseline} on every held-out metric, paired by "
            f"index, unadjusted p (exploratory): called better or worse on {hits} of {len(tested)} "
            f"metrics at α = {p.alpha:g}, where chance alone gives about α·{len(tested)} = "
            f"{p.alpha * len(tested):.2g}. Its registered comparisons are in the family above.")


def format_aa(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame([{"metric": labelled(r.metric), "n": str(r.n),
                         "Δ ± 95% CI": pm(r.delta, r.ci95, signed=True), "p": pvalue(r.p),
                         "verdict†": r.verdict} for r in table.itertuples()])
    return out.set_index("metric") if len(out) else out


def control_lines(df: pd.DataFrame) -> list[str]:
    """The banner for a printed summary: the results' pre-registration, its controls checked."""
    p, _ = preregistration(df)
    if p is None or not p.control_arms():
        return []
    return banner(controls_table(prereg_table(df, p), p))


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
    """Per arm of the family × primary metric: the end value and the curve's mean level (mean ±
    95% CI over seeds), and the paired Δ of the mean level against the baseline. Empty when no trial was
    evaluated at two steps or more (``eval.every: 0``)."""
    cols = ["arm", "metric", "n", "end", "end_ci", "auc", "auc_ci", "delta_auc", "delta_auc_ci"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    split, rows = held_out_split(df), []
    arms = dict.fromkeys([p.baseline, *(a for c in p.triples() for a in (c.arm, c.reference))])
    for m in p.metrics():
        end, auc = final_values(df, m, split), curve_values(df, m, split).dropna()
        for arm in arms:
            if arm not in set(auc.index.get_level_values("strategy")):
                continue
            e_mean, e_ci, _ = mean_ci(end.xs(arm, level="strategy").tolist())
            a_mean, a_ci, n = mean_ci(auc.xs(arm, level="strategy").tolist())
            both = paired(auc, arm, p.baseline, p.seed_offsets)
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
