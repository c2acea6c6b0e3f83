"""Small statistics for reports: Student-t intervals over seeds, paired differences, Pareto masks,
and the pre-registered analysis (paired t test, Holm, minimum detectable effect, TOST, verdict,
the mean level of a curve).

Pure numpy (scipy used for the t quantile when importable; the t distribution function is exact
for integer degrees of freedom without it); no pandas here.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# t_{0.975, df} for df = 1..30 (two-sided 95%), from the standard table (e.g. NIST/SEMATECH
# e-Handbook of Statistical Methods, §1.3.6.7.2); used only when scipy is not importable.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964  # normal quantile: the t quantile's limit for df > 30 in the fallback


def t_quantile(df: int, q: float = 0.975, use_scipy: bool = True) -> float:
    """Student-t quantile t_{q, df}: scipy.stats.t.ppf when available, else the 97.5% table.

    The fallback only knows q = 0.975: the table above for df ≤ 30, 1.96 beyond (the error
    there is < 2%: t_{0.975,30} = 2.042).
    """
    if df < 1:
        return float("nan")
    if use_scipy:
        try:
            from scipy.stats import t

            return float(t.ppf(q, df))
        except ImportError:
            pass
    if abs(q - 0.975) > 1e-12:
        return t_quantile_bisect(df, q)
    return T975[df - 1] if df <= len(T975) else Z975


def t_quantile_bisect(df: int, q: float) -> float:
    """t_{q, df} by bisection on :func:`t_cdf` (exact for integer df), to ~1e-12: the fallback
    for quantiles other than 0.975 without scipy."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def t_central(t: float, df: int) -> float:
    """A(t|ν) = P(|T| ≤ |t|) for Student's t with integer ν ≥ 1, in closed form.

    θ = arctan(|t|/√ν). ν odd: A = (2/π)[θ + sin θ (cos θ + (2/3)cos³θ + … + (2·4⋯(ν−3))/(1·3⋯(ν−2))
    cos^{ν−2}θ)] (ν = 1: 2θ/π); ν even: A = sin θ [1 + (1/2)cos²θ + (1·3)/(2·4)cos⁴θ + … +
    (1·3⋯(ν−3))/(2·4⋯(ν−2))cos^{ν−2}θ]. Source: Abramowitz & Stegun, *Handbook of Mathematical
    Functions*, 26.7.3 and 26.7.4.
    """
    if math.isinf(t):
        return 1.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        term = series = math.cos(theta) if df > 1 else 0.0
        for j in range(1, (df - 3) // 2 + 1):  # powers cos³ … cos^{ν−2}
            term *= c2 * (2 * j) / (2 * j + 1)
            series += term
        return min(1.0, 2 / math.pi * (theta + s * series))
    term = series = 1.0
    for j in range(1, (df - 2) // 2 + 1):  # powers cos² … cos^{ν−2}
        term *= c2 * (2 * j - 1) / (2 * j)
        series += term
    return min(1.0, s * series)


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) = 1/2 + sign(t)·A(t|ν)/2 (symmetry of Student's t; A from :func:`t_central`)."""
    return 0.5 + math.copysign(t_central(t, df), t) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width, n) of the Student-t interval mean ± t_{1-α/2, n-1} · s / √n.

    s is the sample standard deviation (ddof = 1); NaNs are dropped; n = 1 gives a NaN
    half-width (one seed says nothing about the spread). Source: any statistics text, e.g.
    Wasserman, *All of Statistics*, §10 (the t interval for a normal mean).
    """
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(x[0]), float("nan"), 1
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

    t = d̄/(s_d/√n), two-sided p = 1 − A(|t| | n − 1) (Student 1908; any text, e.g. Wasserman,
    *All of Statistics*, §10.4). Returns mean, sd (ddof 1), n, t, p; NaNs dropped. n < 2: t and
    p NaN. s_d = 0: every seed moved by the same amount, so p = 0 if d̄ ≠ 0 and 1 if d̄ = 0.
    """
    x = np.asarray([v for v in d if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    if n < 2:
        return {"mean": mean, "sd": sd, "n": n, "t": float("nan"), "p": float("nan")}
    if sd == 0:
        return {"mean": mean, "sd": sd, "n": n, "t": math.copysign(math.inf, mean) if mean else 0.0,
                "p": 0.0 if mean else 1.0}
    t = mean / (sd / math.sqrt(n))
    return {"mean": mean, "sd": sd, "n": n, "t": t, "p": max(0.0, 1.0 - t_central(t, n - 1))}


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values over one family of m hypotheses.

    Sort ascending, p̃_(i) = min(1, max_{j ≤ i} (m − j + 1)·p_(j)); reject H_(i) when p̃_(i) < α,
    which controls the family-wise error at α. A NaN p (a comparison without data) still counts
    in m and sorts last as if p = 1: it can never be rejected, and leaving it out of m would
    make the others easier to reject. Source: Holm (1979), *A simple sequentially rejective
    multiple test procedure*, Scand. J. Statist. 6, 65–70.
    """
    vals = [1.0 if v is None or math.isnan(v) else float(v) for v in p]
    m, out, running = len(vals), [float("nan")] * len(vals), 0.0
    for i, k in enumerate(sorted(range(m), key=lambda k: vals[k])):
        running = max(running, (m - i) * vals[k])  # i is 0-based: (m − (i+1) + 1)
        out[k] = min(1.0, running) if not (p[k] is None or math.isnan(p[k])) else float("nan")
    return out


def mde_paired(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided paired t test at level α with power 1 − β.

    MDE = (t_{1−α/2, n−1} + t_{1−β, n−1})·s_d/√n: the true mean difference that a test on n
    seeds with this spread rejects with probability ≈ power (the usual approximation that
    ignores the far tail). Source: Cohen (1988), *Statistical Power Analysis for the Behavioral
    Sciences*, ch. 2; e.g. Chow, Shao & Wang, *Sample Size Calculations in Clinical Research*,
    §3.1 (the one-sample/paired t, with t quantiles in place of z).
    """
    if n < 2 or sd is None or math.isnan(sd):
        return float("nan")
    return (t_quantile(n - 1, 1 - alpha / 2) + t_quantile(n - 1, power)) * sd / math.sqrt(n)


def tost_interval(mean: float, sd: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The (1 − 2α) t interval of the mean difference: d̄ ± t_{1−α, n−1}·s_d/√n.

    Lying inside (−margin, +margin) is the two one-sided tests (TOST) rejecting both
    "Δ ≤ −margin" and "Δ ≥ +margin" at level α. Source: Schuirmann (1987), J. Pharmacokinet.
    Biopharm. 15, 657–680; Lakens (2017), Soc. Psychol. Personal. Sci. 8, 355–362.
    """
    if n < 2 or sd is None or math.isnan(sd):
        return float("nan"), float("nan")
    half = t_quantile(n - 1, 1 - alpha) * sd / math.sqrt(n)
    return mean - half, mean + half


def equivalent(interval: tuple[float, float], margin: float | None) -> bool:
    """TOST's decision: the (1 − 2α) interval strictly inside (−margin, +margin)."""
    lo, hi = interval
    if margin is None or math.isnan(margin) or math.isnan(lo) or math.isnan(hi):
        return False
    return -margin < lo and hi < margin


def verdict(delta: float, p_adj: float, interval: tuple[float, float], margin: float | None,
            higher_is_better: bool, alpha: float = 0.05) -> str:
    """One of :data:`VERDICTS` for Δ = arm − baseline.

    *better*/*worse*: the (Holm-adjusted) p < α, the sign of Δ read through the metric's
    direction (lower fd_ref is better); else *equivalent within the margin* when TOST's (1 − 2α)
    interval lies inside ±margin; else *inconclusive*. A difference that is significant and
    also inside the margin is reported as better/worse: the test comes first.
    """
    if not math.isnan(p_adj) and p_adj < alpha and delta != 0:
        return "better" if (delta > 0) == bool(higher_is_better) else "worse"
    return "equivalent within the margin" if equivalent(interval, margin) else "inconclusive"


def curve_mean(steps: Sequence[float], values: Sequence[float]) -> float:
    """The mean level of a curve: trapezoidal area under value(step) over the step range.

    AUC/(s_max − s_min) = Σ_k (s_{k+1} − s_k)(v_k + v_{k+1})/2 / (s_max − s_min), points sorted
    by step, NaNs dropped; the same units as the metric, so it compares with the end value.
    Fewer than two distinct steps: NaN (no curve). Source: the trapezoid rule, e.g. Press et
    al., *Numerical Recipes*, §4.1.
    """
    pts = sorted((float(s), float(v)) for s, v in zip(steps, values)
                 if not (v is None or math.isnan(v)))
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return float("nan")
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])
