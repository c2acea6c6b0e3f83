"""Small statistics for reports: Student-t intervals over seeds, paired differences, Pareto masks.

Pure numpy (scipy used for the t quantile when importable); no pandas here.
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
        raise ValueError(f"t_quantile: without scipy only q = 0.975 is tabulated, got {q}")
    return T975[df - 1] if df <= len(T975) else Z975


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
