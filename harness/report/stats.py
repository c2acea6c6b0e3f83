"""Statistics for reports: Student-t intervals over seeds, paired differences, Pareto masks, and
the pre-registered analysis (paired t test, Holm, TOST, power / minimum detectable effect, the
verdict, the mean level of a curve).

The distributions and tests come from the libraries: scipy.stats (t quantiles, the paired t
test, the noncentral t behind exact power: :mod:`harness.power`, re-exported here),
scipy.optimize (the power's root), statsmodels (Holm's adjustment, the paired TOST). What stays
here is what no library has: intervals assembled from those pieces, the report's conventions
for missing data and zero spread, the verdict's wording, the Pareto mask over report rows and
the curve's mean level. No pandas here.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as sps
from scipy.integrate import trapezoid
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW

# t quantiles, the paired t test's power and TOST's reach live in harness.power, below
# harness.config (a sweep file's pilot numbers are checked at load time): call them there
from harness.power import t_quantile

NAN = float("nan")


def finite(values: Sequence[float]) -> np.ndarray:
    """The values as a float array, None and NaN dropped (a seed without a result)."""
    return np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width, n) of the Student-t interval mean ± t_{1-α/2, n-1} · s / √n.

    s is the sample standard deviation (ddof = 1); NaNs are dropped; n = 1 gives a NaN
    half-width (one seed says nothing about the spread). Source: any statistics text, e.g.
    Wasserman, *All of Statistics*, §10 (the t interval for a normal mean).
    """
    x = finite(values)
    n = len(x)
    if n == 0:
        return NAN, NAN, 0
    if n == 1:
        return float(x[0]), NAN, 1
    half = t_quantile(n - 1, 1 - (1 - level) / 2) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(half), n


def paired_delta(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """Paired difference a − b (same seeds, aligned by position): mean_ci of d_i = a_i − b_i.

    Pairing removes the between-seed variance the two runs share (same data order, same
    initialisation), so the interval is tighter than the difference of two unpaired intervals.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return mean_ci(d.tolist(), level)


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` [N, M].

    ``directions[j]`` is True when objective j is maximised. Row i is dominated when some row k
    is at least as good on every objective and strictly better on one. Rows with a NaN are never
    on the front. Duplicates of a front point are all kept. O(N²·M), fine for sweep sizes.
    (Optuna computes the same front only for trials of a Study, ``Study.best_trials``; its
    array function is private, so the report's rows are masked here.)
    """
    p = np.asarray(points, dtype=float).reshape(len(points), len(directions))
    sign = np.where(np.asarray(directions, dtype=bool), 1.0, -1.0)
    g = p * sign  # now every objective is maximised
    ok = ~np.isnan(g).any(axis=1)
    mask = ok.copy()
    for i in np.flatnonzero(ok):
        others = g[ok]
        dominated = (others >= g[i]).all(axis=1) & (others > g[i]).any(axis=1)
        mask[i] = not dominated.any()
    return mask


# ---------------------------------------------------------------- the pre-registered analysis
VERDICTS = ("better", "worse", "equivalent within the margin", "inconclusive")


def paired_t_test(d: Sequence[float]) -> dict[str, float]:
    """The paired t test of mean(d) = 0 on per-seed differences d_i = a_i − b_i.

    t = d̄/(s_d/√n), two-sided p = 2·P(T_{n−1} ≥ |t|): scipy.stats.ttest_1samp(d, 0), the same
    test as ttest_rel(a, b) (Student 1908; Wasserman, *All of Statistics*, §10.4). Returns mean,
    sd (ddof 1), n, t, p; NaNs dropped. n < 2: t and p NaN. s_d = 0 (scipy has no t there):
    every seed moved by the same amount, so p = 0 if d̄ ≠ 0 and 1 if d̄ = 0.
    """
    x = finite(d)
    n = len(x)
    mean = float(x.mean()) if n else NAN
    sd = float(x.std(ddof=1)) if n > 1 else NAN
    if n < 2:
        return {"mean": mean, "sd": sd, "n": n, "t": NAN, "p": NAN}
    if sd == 0:
        return {"mean": mean, "sd": sd, "n": n, "t": math.copysign(math.inf, mean) if mean else 0.0,
                "p": 0.0 if mean else 1.0}
    res = sps.ttest_1samp(x, 0.0)
    return {"mean": mean, "sd": sd, "n": n, "t": float(res.statistic), "p": float(res.pvalue)}


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values over one family of m hypotheses:
    statsmodels.stats.multitest.multipletests(p, method="holm").

    p sorted ascending, p̃_(i) = min(1, max_{j ≤ i} (m − j + 1)·p_(j)); reject H_(i) when
    p̃_(i) < α (family-wise error ≤ α). A NaN p (a comparison without data) still counts in m as
    p = 1, so it is never rejected and leaving it out cannot make the others easier to reject;
    its adjusted p stays NaN. Source: Holm (1979), Scand. J. Statist. 6, 65–70.
    """
    if len(p) == 0:
        return []
    missing = [v is None or math.isnan(v) for v in p]
    vals = np.asarray([1.0 if gone else float(v) for v, gone in zip(p, missing)])
    adjusted = multipletests(vals, method="holm")[1]
    return [NAN if gone else float(a) for a, gone in zip(adjusted, missing)]


def tost_interval(mean: float, sd: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The (1 − 2α) t interval of the mean difference: d̄ ± t_{1−α, n−1}·s_d/√n.

    Lying inside (−margin, +margin) is the same decision as :func:`tost_paired` p < α (the
    interval-inclusion form of TOST). Source: Schuirmann (1987), J. Pharmacokinet. Biopharm. 15,
    657–680; Lakens (2017), Soc. Psychol. Personal. Sci. 8, 355–362.
    """
    if n < 2 or sd is None or math.isnan(sd):
        return NAN, NAN
    half = t_quantile(n - 1, 1 - alpha) * sd / math.sqrt(n)
    return mean - half, mean + half


def tost_paired(d: Sequence[float], margin: float | None) -> float:
    """p of the two one-sided paired t tests of "Δ ≤ −margin" and "Δ ≥ +margin":
    max(p₋, p₊), statsmodels DescrStatsW(d).ttost_mean(−margin, margin) (= ttost_paired).

    Equivalence within the margin is p < α. NaN without a margin or with fewer than two seeds;
    s_d = 0: 0 when |d̄| < margin, else 1 (every seed moved by the same amount). Source:
    Schuirmann (1987); Lakens (2017).
    """
    x = finite(d)
    if margin is None or math.isnan(margin) or len(x) < 2:
        return NAN
    if x.std(ddof=1) == 0:
        return 0.0 if abs(x.mean()) < margin else 1.0
    return float(DescrStatsW(x).ttost_mean(-margin, margin)[0])


def verdict(delta: float, p_adj: float, p_tost: float, higher_is_better: bool,
            alpha: float = 0.05) -> str:
    """One of :data:`VERDICTS` for Δ = arm − baseline.

    *better*/*worse*: the (Holm-adjusted) p < α, the sign of Δ read through the metric's
    direction (lower fd_ref is better); else *equivalent within the margin* when TOST's p < α
    (:func:`tost_paired`); else *inconclusive*. A difference that is significant and also inside
    the margin is reported as better/worse: the test comes first.
    """
    if not math.isnan(p_adj) and p_adj < alpha and delta != 0:
        return "better" if (delta > 0) == bool(higher_is_better) else "worse"
    equivalent = not math.isnan(p_tost) and p_tost < alpha
    return "equivalent within the margin" if equivalent else "inconclusive"


def curve_mean(steps: Sequence[float], values: Sequence[float]) -> float:
    """The mean level of a curve: trapezoidal area under value(step) over the step range.

    AUC/(s_max − s_min), AUC = Σ_k (s_{k+1} − s_k)(v_k + v_{k+1})/2 (scipy.integrate.trapezoid),
    points sorted by step, NaNs dropped; the same units as the metric, so it compares with the
    end value. Fewer than two distinct steps: NaN (no curve). Source: the trapezoid rule, e.g.
    Press et al., *Numerical Recipes*, §4.1.
    """
    pts = np.asarray(sorted((float(s), float(v)) for s, v in zip(steps, values)
                            if not (v is None or math.isnan(v)))).reshape(-1, 2)
    if len(pts) < 2 or pts[-1, 0] == pts[0, 0]:
        return NAN
    return float(trapezoid(pts[:, 1], pts[:, 0])) / (pts[-1, 0] - pts[0, 0])
