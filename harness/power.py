"""How many paired seeds a comparison needs: the exact power of the paired t test and TOST's reach.

Pure functions of numbers (scipy's t and noncentral t, scipy.optimize's root), no pandas. They sit
below :mod:`harness.config` so a sweep file's pilot numbers (``preregistration.pilot``) are
checked when the file is loaded, and above nothing: :mod:`harness.report.stats` re-exports them
for the report, :mod:`harness.pilot` calls them to size a run. Formulas: docs/evaluation.md,
"Pre-registered statistics".
"""
from __future__ import annotations

import math

from scipy import stats as sps
from scipy.optimize import brentq

NAN = float("nan")


def t_quantile(df: int, q: float = 0.975) -> float:
    """Student-t quantile t_{q, df} = scipy.stats.t.ppf(q, df); NaN for df < 1."""
    return float(sps.t.ppf(q, df)) if df >= 1 else NAN


def t_test_power(d: float, n: int, alpha: float = 0.05) -> float:
    """Exact power of the two-sided one-sample (paired) t test on n differences at standardised
    effect d = Δ/s_d: P(T'_δ > c) + P(T'_{−δ} > c), c = t_{1−α/2, n−1}, T'_δ noncentral t with
    n − 1 df and noncentrality δ = d·√n (both tails; scipy.stats.nct.sf; Cohen 1988, *Statistical
    Power Analysis for the Behavioral Sciences*, ch. 2).

    The lower tail is taken as the upper tail at −δ, not as nct.cdf(−c): that cdf is NaN far in
    the tail (scipy/scipy#25470), which makes statsmodels' TTestPower.power NaN for large d.
    """
    c, nc = t_quantile(n - 1, 1 - alpha / 2), d * math.sqrt(n)
    return float(sps.nct.sf(c, n - 1, nc) + sps.nct.sf(c, n - 1, -nc))


def mde_paired(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided paired t test at level α with the given power:
    MDE = d*·s_d, t_test_power(d*, n, α) = power, the root by scipy.optimize.brentq.

    Exact noncentral-t power, not the (t_{1−α/2} + t_{power})·s_d/√n approximation, which is
    ~5% low at n = 3. (TTestPower.solve_power is not used: for few seeds its root misses, e.g.
    n = 3, α = 0.01, power 0.8 gives d = 7.17 whose power is 0.787.) NaN for n < 2, a NaN s_d,
    or power ≤ α (every Δ, even 0, is detected that often).
    """
    if n < 2 or sd is None or math.isnan(sd) or power <= alpha:
        return NAN
    hi = 1.0
    while t_test_power(hi, n, alpha) < power:  # the power rises with d: bracket the root
        hi *= 2
    d = brentq(lambda x: t_test_power(x, n, alpha) - power, 0.0, hi, xtol=1e-12)
    return d * sd


def smallest_n(enough) -> int:
    """The smallest integer n ≥ 2 with ``enough(n)``, for a predicate that stays true once true
    (doubling, then bisection on the integers)."""
    lo, hi = 1, 2  # n = 1 is no paired test; grow hi until enough(hi)
    while not enough(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def seeds_for_mde(sd: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Paired seeds a two-sided paired t test needs to detect a true Δ = ``mde`` at level α
    with the given power, the differences' spread being ``sd`` (e.g. a pilot's s_d).

    The smallest integer n ≥ 2 with t_test_power(mde/sd, n, α) ≥ power (the power rises with
    n). sd = 0: 2, the fewest a t test can use.
    """
    if not (mde > 0 and sd >= 0):
        raise ValueError(f"seeds_for_mde: needs mde > 0 and sd >= 0, got mde={mde}, sd={sd}")
    if sd == 0:
        return 2
    # 1e-9: the root's tolerance, so an MDE's own n counts
    return smallest_n(lambda n: t_test_power(mde / sd, n, alpha) >= power - 1e-9)


def tost_floor(sd: float, n: int, alpha: float = 0.05) -> float:
    """The narrowest margin TOST can ever accept with n paired seeds of spread s_d:
    t_{1−α, n−1}·s_d/√n, the half-width of the (1 − 2α) interval d̄ ± t_{1−α,n−1}·s_d/√n, which
    must lie inside ±margin even when d̄ = 0 (Schuirmann 1987; Lakens 2017). NaN for n < 2."""
    if n < 2 or sd is None or math.isnan(sd):
        return NAN
    return t_quantile(n - 1, 1 - alpha) * sd / math.sqrt(n)


def seeds_for_margin(sd: float, margin: float, alpha: float = 0.05) -> int:
    """The fewest paired seeds with which TOST can accept ±``margin`` at all: the smallest n ≥ 2
    with tost_floor(s_d, n, α) < margin (the floor falls like t·s_d/√n)."""
    if not (margin > 0 and sd >= 0):
        raise ValueError(f"seeds_for_margin: needs margin > 0 and sd >= 0, got {margin}, {sd}")
    return smallest_n(lambda n: tost_floor(sd, n, alpha) < margin)
