"""Pre-registered statistics: the sweep file's section, the maths by hand, and the report's tables.

Synthetic results (arms sum = baseline, genrep, pcgrad; seeds 0, 1, 2; held-out val evaluations at
steps 0, 10 and 20; primary head_acc ↑ (margin 0.01) and fd_ref ↓ (margin 2)):
  head_acc  sum    [0.70, 0.80, 0.90]
            genrep [0.72, 0.84, 0.96]     d = [.02, .04, .06]: d̄ .04, s .02, t = 2√3 = 3.4641
            pcgrad [0.701, 0.799, 0.90]   d = [.001, −.001, 0]: d̄ 0, s .001, t 0, p 1
  fd_ref    sum    [10, 12, 14]
            genrep [7, 9, 11]             d = [−3, −3, −3]: s 0, p 0 (every seed moved by −3)
            pcgrad [13, 15.1, 16.9]       d = [3, 3.1, 2.9]: d̄ 3, s .1, t = 30√3 = 51.96
Two-sided p of the paired t with n − 1 = 2 degrees of freedom: p = 1 − t/√(2 + t²) (A&S 26.7.4).
Holm over m = 4: sorted p (0, p_pf, p_gh, 1) → (4·0, 3·p_pf, 2·p_gh, 1·1), running max, cap 1.
Power of the two-sided paired t with 2 df at noncentrality δ = d·√n, in closed form (below):
1 − (1 − α)·exp(−δ²(1 − (1 − α)²)/2), so the MDE at n = 3 is solved by hand.
The library calls (scipy.stats, statsmodels) are checked against these hand values.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from harness import results
from harness.config import ConfigError, from_dict
from harness.report import build_report
from harness.report.paper import ablation_table, direction_table, format_ablation, format_direction
from harness.report.prereg import (auc_table, format_auc, format_prereg, paired, preregistration,
                                   prereg_table)
from harness.power import mde_paired, seeds_for_mde, t_quantile, t_test_power
from harness.report.stats import (VERDICTS, curve_mean, holm, paired_t_test, tost_interval,
                                  tost_paired, verdict)
from tests.conftest import ROOT

HEAD = {"sum": [0.70, 0.80, 0.90], "genrep": [0.72, 0.84, 0.96], "pcgrad": [0.701, 0.799, 0.90]}
FD = {"sum": [10.0, 12.0, 14.0], "genrep": [7.0, 9.0, 11.0], "pcgrad": [13.0, 15.1, 16.9]}
PREREG = {"primary": ["head_acc", "fd_ref"], "baseline": "sum", "comparisons": ["genrep", "pcgrad"],
          "margins": {"head_acc": 0.01, "fd_ref": 2.0}, "alpha": 0.05, "power": 0.8, "seeds": 3,
          "ablation": [{"arm": "sum", "row": "Baseline"}, {"arm": "genrep", "row": "+ alignment"},
                       {"arm": "pcgrad", "row": "+ projection", "vs": "+ alignment"}],
          "paper_direction": {"+ alignment": {"head_acc": "up", "fd_ref": "down"}}}
SQ3 = math.sqrt(3)


def p_df2(t: float) -> float:
    """Two-sided p of Student's t with 2 degrees of freedom, by hand: 1 − |t|/√(2 + t²)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


# ---------------------------------------------------------------- the maths, by hand
def test_t_distribution_closed_forms():
    """scipy's quantiles and the two-sided p of the paired t against Abramowitz & Stegun 26.7.3/4:
    P(|T| ≤ t) = A(t|ν), θ = arctan(t/√ν); ν = 1: 2θ/π; ν = 2: sin θ; ν = 3: (2/π)(θ + sin θ cos θ)."""
    # quantiles: ν = 1, t_q = tan(π(q − 1/2)); ν = 2, t_q = a√2/√(1 − a²), a = 2q − 1
    assert t_quantile(1, 0.975) == pytest.approx(math.tan(0.475 * math.pi))  # 12.706
    assert t_quantile(2, 0.8) == pytest.approx(0.6 * math.sqrt(2) / 0.8)
    assert math.isnan(t_quantile(0))
    # ν = 1: d = [0, 2], d̄ 1, s √2, t = 1: p = 1 − 2·(π/4)/π = 1/2
    assert paired_t_test([0.0, 2.0])["p"] == pytest.approx(0.5)
    # ν = 3: d = [0, 0, 0, 4], d̄ 1, s 2, t = 1, θ = π/6: p = 1 − (2/π)(π/6 + √3/4) = 2/3 − √3/(2π)
    r = paired_t_test([0.0, 0.0, 0.0, 4.0])
    assert r["t"] == pytest.approx(1.0) and r["p"] == pytest.approx(2 / 3 - SQ3 / (2 * math.pi))
    assert paired_t_test([-0.02, -0.04, -0.06])["p"] == pytest.approx(p_df2(2 * SQ3))  # two-sided


def test_paired_t_test_by_hand():
    r = paired_t_test([0.02, 0.04, 0.06])
    assert (r["mean"], r["sd"], r["n"]) == (pytest.approx(0.04), pytest.approx(0.02), 3)
    assert r["t"] == pytest.approx(2 * SQ3)  # 0.04/(0.02/√3)
    assert r["p"] == pytest.approx(p_df2(2 * SQ3))  # 1 − √12/√14 = 0.07418
    assert r["p"] == pytest.approx(0.0741799, abs=1e-6)
    assert paired_t_test([-3.0, -3.0, -3.0])["p"] == 0.0  # s = 0, d̄ ≠ 0
    assert paired_t_test([0.0, 0.0])["p"] == 1.0
    assert math.isnan(paired_t_test([0.5])["p"])


def test_holm_textbook_example():
    """Four hypotheses with p = 0.01, 0.04, 0.03, 0.005 (the Holm–Bonferroni example): sorted
    0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → running max 0.06; at α = 0.05 H1 and H4
    are rejected, H2 and H3 are not."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1 (0.5·2 = 1.0, max(1, .6))
    adj = holm([0.01, float("nan")])  # a missing comparison still counts in m = 2
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1])


def power_df2(delta: float, alpha: float = 0.05) -> float:
    """Exact power of the two-sided t test with 2 df at noncentrality δ, by hand.

    T' = (Z + δ)/√W, W = χ²₂/2 ~ Exp(1): P(|T'| > c) = 1 − E[exp(−(Z + δ)²/c²)]
    = 1 − exp(−aδ²/(1 + 2a))/√(1 + 2a), a = 1/c² (the noncentral χ²₁ moment generating
    function); with c = t_{1−α/2,2}, c² = 2k²/(1 − k²), k = 1 − α, this is 1 − k·exp(−δ²(1 − k²)/2).
    """
    k = 1 - alpha
    return 1 - k * math.exp(-delta**2 * (1 - k * k) / 2)


def mde_2df(alpha: float, sd: float = 0.02, power: float = 0.8) -> float:
    """The MDE at n = 3 (2 df) by hand: power_df2(δ, α) = power → δ² = 2·ln(k/(1 − power))/(1 − k²),
    k = 1 − α; MDE = δ·s_d/√3."""
    k = 1 - alpha
    return math.sqrt(2 * math.log(k / (1 - power)) / (1 - k * k)) * sd / SQ3


def sm_power(d: float, n: int, alpha: float = 0.05) -> float:
    """The same power from statsmodels (an independent implementation; finite at these d)."""
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().power(d, n, alpha, alternative="two-sided"))


def test_mde_exact_power():
    # n = 3, power 0.8: 1 − 0.95·exp(−0.0975·δ²/2) = 0.8 → δ² = 2·ln(0.95/0.2)/0.0975 = 31.962,
    # δ = 5.6535, MDE = δ·s/√n = 5.6535·0.02/√3 = 0.065281. The old approximation
    # (t_{.975,2} + t_{.8,2})·s/√n = (4.302653 + 1.060660)·0.02/√3 = 0.061930 was 5% too small:
    # it ignored that the noncentral t is wider than a shifted central one.
    delta = math.sqrt(2 * math.log(0.95 / 0.2) / 0.0975)
    assert power_df2(0.0) == pytest.approx(0.05)  # no effect: the test's level
    assert power_df2(delta) == pytest.approx(0.8)
    assert mde_paired(0.02, 3) == pytest.approx(delta * 0.02 / SQ3, rel=1e-6)
    assert mde_paired(0.02, 3) == pytest.approx(0.065281, abs=1e-6)
    assert sm_power(mde_paired(0.02, 10) / 0.02, 10) == pytest.approx(0.8, abs=1e-6)
    for d, n, alpha in ((3.0, 3, 0.05), (1.0, 10, 0.05), (0.5, 34, 0.01), (2.0, 5, 0.1)):
        assert t_test_power(d, n, alpha) == pytest.approx(sm_power(d, n, alpha), abs=1e-9)
    assert mde_paired(1.0, 3, 0.01) > 7.2  # statsmodels' solve_power stops short here (d = 7.17)
    assert t_test_power(40.0, 2, 0.01) > 0.5  # statsmodels' power is NaN here (lower tail)
    assert mde_paired(0.02, 12) < mde_paired(0.02, 3)  # more seeds: a smaller detectable effect
    assert math.isnan(mde_paired(0.02, 1)) and math.isnan(mde_paired(float("nan"), 5))


def test_seeds_for_mde():
    assert seeds_for_mde(0.02, mde_paired(0.02, 3)) == 3  # the inverse of the MDE, at n = 3
    assert seeds_for_mde(0.02, mde_paired(0.02, 7, 0.01, 0.9), 0.01, 0.9) == 7
    n = seeds_for_mde(0.02, 0.01)  # the docs' example: s_d 0.02, Δ 0.01 → 34 seeds
    assert sm_power(0.5, n) >= 0.8 > sm_power(0.5, n - 1) and n == 34
    assert seeds_for_mde(0.0, 0.01) == 2 and seeds_for_mde(0.02, 1.0) == 2  # huge effect: the floor
    with pytest.raises(ValueError, match="mde > 0"):
        seeds_for_mde(0.02, 0.0)


def test_tost_cases():
    t95 = 0.9 * math.sqrt(2) / math.sqrt(1 - 0.81)  # t_{.95,2} = 2.919986
    lo, hi = tost_interval(0.04, 0.02, 3, alpha=0.05)  # the 90% interval
    assert (lo, hi) == (pytest.approx(0.04 - t95 * 0.02 / SQ3), pytest.approx(0.04 + t95 * 0.02 / SQ3))
    assert (lo, hi) == (pytest.approx(0.006283, abs=1e-6), pytest.approx(0.073717, abs=1e-6))
    # TOST p = max over the one-sided tests; the binding one is Δ ≥ +margin, t = (d̄ − m)/(s/√3):
    # margin 0.08: t = −2√3, p = P(T₂ ≤ −2√3) = p_df2(2√3)/2 = 0.0371 < α (interval inside ±0.08)
    d = [0.02, 0.04, 0.06]
    assert tost_paired(d, 0.08) == pytest.approx(p_df2(2 * SQ3) / 2)
    # margin 0.05: t = −√3/2, p = p_df2(√3/2)/2 = 0.239 (the interval reaches 0.0737 > 0.05)
    assert tost_paired(d, 0.05) == pytest.approx(p_df2(SQ3 / 2) / 2)
    assert tost_paired(d, hi) == pytest.approx(0.05)  # margin on the interval's edge: p = α, not < α
    assert math.isnan(tost_paired(d, None)) and math.isnan(tost_paired([0.1], 1.0))
    assert tost_paired([-3.0] * 3, 2.0) == 1.0 and tost_paired([0.5, 0.5], 1.0) == 0.0  # s = 0
    # the two forms of TOST agree: p < α exactly when the (1 − 2α) interval is inside ±margin
    for m in (0.03, 0.06, 0.07, 0.074, 0.08, 0.2):
        assert (tost_paired(d, m) < 0.05) == (-m < lo and hi < m), m
    assert verdict(0.04, 0.5, tost_paired(d, 0.08), True) == "equivalent within the margin"
    assert verdict(0.04, 0.5, tost_paired(d, 0.05), True) == "inconclusive"
    assert verdict(0.04, 0.5, 0.05, True) == "inconclusive"  # TOST p = α: not equivalent
    assert verdict(0.0, 0.5, tost_paired(d, None), True) == "inconclusive"  # no margin


def test_verdict_cases_and_sign_flip():
    inside = 0.001  # TOST p: equivalent within the margin
    assert verdict(+0.04, 0.01, inside, True) == "better"  # higher is better, Δ > 0
    assert verdict(-0.04, 0.01, inside, True) == "worse"
    assert verdict(+3.0, 0.01, 1.0, False) == "worse"  # fd_ref ↓: a rise is worse
    assert verdict(-3.0, 0.01, 1.0, False) == "better"
    assert verdict(+0.04, 0.05, inside, True) == "equivalent within the margin"  # p = α: no
    assert verdict(+0.04, float("nan"), float("nan"), True) == "inconclusive"
    assert set(VERDICTS) == {"better", "worse", "equivalent within the margin", "inconclusive"}


def test_curve_mean_trapezoid():
    # steps 0, 10, 30; values 0, 1, 1: area 10·(0+1)/2 + 20·(1+1)/2 = 25, range 30 → 0.8333
    assert curve_mean([0, 10, 30], [0.0, 1.0, 1.0]) == pytest.approx(25 / 30)
    assert curve_mean([30, 0, 10], [1.0, 0.0, 1.0]) == pytest.approx(25 / 30)  # order-free
    assert curve_mean([0, 5, 9], [0.4, 0.4, 0.4]) == pytest.approx(0.4)  # a flat curve: its level
    assert math.isnan(curve_mean([20], [0.9])) and math.isnan(curve_mean([5, 5], [0.1, 0.2]))


# ---------------------------------------------------------------- the sweep file's section
def sweep(**prereg) -> dict:
    raw = yaml.safe_load((ROOT / "sweeps" / "compare.yaml").read_text())
    raw["seeds"] = [0, 1, 2, 3, 4]
    raw["preregistration"] = {"primary": ["head_acc", "fd_ref"], "baseline": "sum",
                              "margins": {"head_acc": 0.01, "fd_ref": 2.0},
                              "ablation": [{"arm": "sum_nokd", "row": "Baseline"},
                                           {"arm": "sum", "row": "+ generative perception learning"}],
                              "paper_direction": {"+ generative perception learning":
                                                  {"head_acc": "up", "fd_ref": "down"}}} | prereg
    return raw


@pytest.fixture(scope="module")
def valid():
    return from_dict(sweep(), "sweeps/x.yaml")


def test_the_section_parses_with_defaults(valid):
    p = valid.preregistration
    assert (p.primary, p.baseline, p.alpha, p.power, p.seeds) == (("head_acc", "fd_ref"), "sum", 0.05, 0.8, 5)
    assert p.ablation[1].row == "+ generative perception learning" and p.ablation[1].vs is None
    full = p.resolved(valid.labels()).comparisons  # default: every other arm, variants included
    assert "sum" not in full and {"genrep", "pcgrad", "separate", "sum_w", "sum_nokd"} <= set(full)
    assert valid.trials()  # the variants' overrides still validate with the section present


@pytest.mark.parametrize("patch, seeds, words", [
    ({}, [0, 1, 2], "sweeps/x.yaml: seeds: 3 listed, fewer than the 5 paired seeds registered in "
                    "preregistration.seeds"),
    ({"baseline": "summ"}, None, "preregistration.baseline: 'summ' is no arm of this sweep"),
    ({"comparisons": ["genrep", "nope"]}, None, "preregistration.comparisons[1]: 'nope' is no arm"),
    ({"comparisons": ["sum"]}, None, "preregistration.comparisons: distinct arms other than the baseline"),
    ({"primary": ["acc"], "margins": {"acc": 1}}, None,
     "preregistration.primary[0]: 'acc' is not a held-out"),
    ({"primary": ["miou"], "margins": {"miou": 0.01}}, None, "primary[0]: miou needs the segment task"),
    ({"margins": {"head_acc": 0.01}}, None, "preregistration.margins.fd_ref: every metric of the family needs"),
    ({"margins": {"head_acc": 0.01, "fd_ref": 0}}, None, "preregistration.margins.fd_ref"),
    ({"margins": {"head_acc": 0.01, "fd_ref": 2, "sample_acc": 0.1}}, None,
     "preregistration.margins.sample_acc: not a metric of the family"),
    ({"alpha": 0.5}, None, "preregistration.alpha: must be in (0, 0.5)"),
    ({"seeds": 1}, None, "preregistration.seeds: must be >= 2"),
    ({"primary": ["head_acc", "head_acc"]}, None, "preregistration.primary: distinct"),
    ({"ablation": [{"arm": "zz", "row": "B"}], "paper_direction": {}}, None, "ablation[0].arm: 'zz'"),
    ({"ablation": [{"arm": "sum", "row": "B"}, {"arm": "pcgrad", "row": "B"}], "paper_direction": {}},
     None, "row names must be distinct"),
    ({"ablation": [{"arm": "sum", "row": "B", "vs": "B"}], "paper_direction": {}}, None, "ablation[0].vs"),
    ({"paper_direction": {"+ x": {"head_acc": "up"}}}, None, "paper_direction.+ x: no ablation row"),
    ({"paper_direction": {"+ generative perception learning": {"head_acc": "higher"}}}, None,
     "paper_direction.+ generative perception learning.head_acc: must be up or down"),
    ({"paper_direction": {"+ generative perception learning": {"cos": "up"}}}, None,
     "not a registered metric with a direction"),
    ({"bogus": 1}, None, "preregistration.bogus: unknown field"),
])
def test_bad_sections_name_the_field_and_the_file(patch, seeds, words):
    raw = sweep(**patch)
    if seeds:
        raw["seeds"] = seeds
    with pytest.raises(ConfigError) as e:
        from_dict(raw, "sweeps/x.yaml")
    assert str(e.value).startswith("sweeps/x.yaml: ") and words in str(e.value)


def test_no_preregistration_with_a_grid_or_search():
    raw = sweep()
    raw["grid"] = {"train.lr": [0.001, 0.002]}
    with pytest.raises(ConfigError, match="preregistration: pairs fixed arms on seeds"):
        from_dict(raw, "sweeps/x.yaml")


def test_every_result_row_carries_it(valid):
    """harness.sweep.trial_rows stores the section (comparisons resolved) in the row's config."""
    from harness.sweep import trial_rows

    report = {"step": 300, "split": "val", "head_acc": 0.9}
    res = SimpleNamespace(config={"variant": "sum_w", "seed": 3}, error=None, metrics=report,
                          metrics_dataframe=pd.DataFrame([report]))
    rows, _ = trial_rows(res, valid, SimpleNamespace(trial_id="t", status="TERMINATED",
                                                      num_failures=0), {}, "sha", "{}")
    stored = json.loads(rows[0]["config"])["preregistration"]
    assert stored["baseline"] == "sum" and "sum_w" in stored["comparisons"]
    p, note = preregistration(results.frame(rows).assign(sweep="x"))
    assert note is None and p.comparisons == valid.preregistration.resolved(valid.labels()).comparisons


# ---------------------------------------------------------------- the report's tables
def rows_of(arm: str, seed: int, prereg: dict | None, failed: bool = False) -> list[dict]:
    """Held-out val evaluations at steps 0 (untrained: 0.1, fd 100), 10 and 20 (both the end value)."""
    cfg = {"strategy": {"name": arm}, "seed": seed, **({"preregistration": prereg} if prereg else {})}
    fields = results.trial_fields(cfg, f"{arm}-{seed}", "h", "failed" if failed else "ok", "", "sha", "{}")
    head, fd = HEAD[arm][seed], FD[arm][seed]
    history = [{"step": 0, "split": "val", "head_acc": 0.1, "fd_ref": 100.0, "sample_acc": 0.1}]
    history += [{"step": s, "split": "val", "head_acc": head, "fd_ref": fd, "sample_acc": 0.5}
                for s in (10, 20)]
    return results.long_rows(history, fields)


def frame(prereg=PREREG, extra=()) -> pd.DataFrame:
    rows = [r for arm in HEAD for seed in range(3) for r in rows_of(arm, seed, prereg)]
    return results.frame(rows + list(extra)).assign(sweep="pre")


@pytest.fixture(scope="module")
def df():
    return frame()


@pytest.fixture(scope="module")
def p(df):
    return preregistration(df)[0]


@pytest.fixture(scope="module")
def table(df, p):
    return prereg_table(df, p).set_index(["arm", "metric"])


def test_prereg_table_by_hand(table):
    gh, gf, ph, pf = (table.loc[k] for k in [("genrep", "head_acc"), ("genrep", "fd_ref"),
                                            ("pcgrad", "head_acc"), ("pcgrad", "fd_ref")])
    assert gh["delta"] == pytest.approx(0.04) and gh["n"] == 3
    assert gh["ci95"] == pytest.approx(4.302653 * 0.02 / SQ3, abs=1e-6)
    assert gh["p"] == pytest.approx(p_df2(2 * SQ3))
    assert gh["mde"] == pytest.approx(0.065281, abs=1e-6)  # exact power, test_mde_exact_power
    assert gh["mde_holm"] == pytest.approx(mde_2df(0.05 / 4), rel=1e-6)  # at α/m, m = 4: 0.1309
    assert gh["tost_lo"] == pytest.approx(0.006283, abs=1e-6)
    assert gh["tost_hi"] == pytest.approx(0.073717, abs=1e-6)
    assert gf["p"] == 0.0 and pf["p"] == pytest.approx(p_df2(30 * SQ3))
    assert ph["p"] == pytest.approx(1.0) and ph["delta"] == pytest.approx(0.0, abs=1e-12)
    # Holm, m = 4: sorted (gf 0, pf, gh, ph 1) × (4, 3, 2, 1), running max
    assert gf["p_holm"] == 0.0 and pf["p_holm"] == pytest.approx(3 * p_df2(30 * SQ3))
    assert gh["p_holm"] == pytest.approx(2 * p_df2(2 * SQ3)) and ph["p_holm"] == 1.0
    assert gf["verdict"] == "better"  # fd_ref fell by 3 on every seed: lower is better
    assert pf["verdict"] == "worse"  # fd_ref rose by 3
    assert gh["verdict"] == "inconclusive"  # p (Holm) 0.148; the 90% CI reaches 0.074 > 0.01
    # pcgrad head_acc: s = 0.001, 90% CI ±t_{.95,2}·0.001/√3 = ±0.00169 inside ±0.01; TOST's
    # binding t = (0.01 − 0)/(0.001/√3) = 10√3, p = p_df2(10√3)/2 = 0.00166
    assert ph["verdict"] == "equivalent within the margin"
    assert ph["p_tost"] == pytest.approx(p_df2(10 * SQ3) / 2, rel=1e-6)
    # genrep head_acc: d̄ = 0.04 above +0.01: t = (0.04 − 0.01)/(0.02/√3) = 1.5√3, p = P(T₂ ≤ 1.5√3)
    assert gh["p_tost"] == pytest.approx(1 - p_df2(1.5 * SQ3) / 2)


def test_format_prereg(table, p):
    t = format_prereg(table.reset_index(), p)
    row = t[t["metric"] == "fd_ref ↓"].loc["genrep − sum"]
    assert (row["p"], row["p (Holm)"], row["verdict"], row["margin"]) == ("<0.001", "<0.001", "better", "±2")
    assert t[t["metric"] == "head_acc ↑"].loc["genrep − sum", "Δ ± 95% CI"] == "+0.040 ± 0.050"
    assert t[t["metric"] == "head_acc ↑"].loc["genrep − sum", "MDE (α = 0.05)"] == "0.0653"
    # α/m = 0.05/4: 2 df in closed form (test_mde_exact_power), δ² = 2·ln(k/0.2)/(1 − k²), k = 1 − α/m
    assert t[t["metric"] == "head_acc ↑"].loc["genrep − sum", "MDE (α/m = 0.0125)"] == f"{mde_2df(0.0125):.3g}"


def test_fewer_paired_seeds_than_registered_is_stated(p):
    more = dict(PREREG, seeds=5)
    t = format_prereg(prereg_table(frame(more), preregistration(frame(more))[0]), p)
    assert set(t["n"]) == {"3 (5 registered)"}


def test_auc_table_by_hand(df, p):
    """Curve (0.1, f, f) at steps (0, 10, 20): (10·(0.1 + f)/2 + 10·f)/20 = 0.025 + 0.75·f."""
    t = auc_table(df, p).set_index(["arm", "metric"])
    s, g = t.loc[("sum", "head_acc")], t.loc[("genrep", "head_acc")]
    assert s["auc"] == pytest.approx(0.025 + 0.75 * 0.8) and s["end"] == pytest.approx(0.8)
    assert g["delta_auc"] == pytest.approx(0.75 * 0.04)
    assert g["delta_auc_ci"] == pytest.approx(0.75 * 4.302653 * 0.02 / SQ3, abs=1e-6)
    assert math.isnan(s["delta_auc"])
    f = format_auc(auc_table(df, p), "sum")
    assert f.loc["sum", "head_acc Δ mean level"] == "(baseline)"
    assert f.loc["genrep", "head_acc Δ mean level"] == pm_text(0.03, 0.75 * 4.302653 * 0.02 / SQ3)


def pm_text(mean, ci):
    from harness.report.tables import pm

    return pm(mean, ci, signed=True)


def test_no_auc_with_one_evaluation(p):
    only_end = frame()
    only_end = only_end[only_end["step"] == 20]
    assert auc_table(only_end, p).empty


def test_paper_ablation_table(df, p):
    t = format_ablation(ablation_table(df, p), p)
    assert t.index.tolist() == ["Baseline", "+ alignment", "+ projection"]  # the given order
    assert t.columns.tolist() == ["arm", "n", "Top-1 (head_acc) ↑", "generation: fd_ref ↓",
                                  "generation: sample_acc ↑"]  # no miou in these results
    assert t.loc["Baseline", "Top-1 (head_acc) ↑"] == "0.80 ± 0.25"
    assert t.loc["+ alignment", "arm"] == "genrep"


def test_paper_direction_table(df, p):
    tidy = direction_table(df, p, prereg_table(df, p))
    t = format_direction(tidy)
    assert t.loc["+ alignment", "vs"] == "Baseline" and t.loc["+ projection", "vs"] == "+ alignment"
    assert t.loc["+ alignment", "fd_ref: paper"] == "↓ (better)"
    assert t.loc["+ alignment", "Top-1: paper"] == "↑ (better)"
    assert t.loc["+ alignment", "fd_ref: ours"].startswith("better (-3")  # pre-registered, Holm
    assert t.loc["+ alignment", "Top-1: ours"].startswith("inconclusive (")
    assert t.loc["+ projection", "Top-1: paper"] == "—"
    # pcgrad − genrep on fd_ref: d = [6, 6.1, 5.9], unadjusted p = 1 − t/√(2 + t²), t = 60√3: †
    row = tidy[(tidy["row"] == "+ projection") & (tidy["metric"] == "fd_ref")].iloc[0]
    assert row["p"] == pytest.approx(p_df2(60 * SQ3)) and not row["preregistered"]
    assert t.loc["+ projection", "fd_ref: ours"].startswith("worse† (+6")


def test_one_sided_rows_without_results_say_so(df):
    q = preregistration(df)[0]
    gone = df[df["strategy"] != "pcgrad"]
    t = format_direction(direction_table(gone, q, prereg_table(gone, q)))
    assert t.loc["+ projection", "Top-1: ours"] == "— (no paired seeds)"
    assert paired(pd.Series(dtype=float), "a", "b").empty


def test_different_preregistrations_are_not_mixed(df):
    other = frame(dict(PREREG, alpha=0.01)).assign(sweep="other")
    p, note = preregistration(pd.concat([df, other]))
    assert p is None and "2 different pre-registrations" in note


@pytest.fixture(scope="module")
def report(tmp_path_factory, df):
    root = tmp_path_factory.mktemp("prereg")
    results.write_parquet_atomic(df.drop(columns="sweep"), root / "pre" / "results.parquet")
    return build_report([root / "pre"], root / "out")


def test_report_sections_and_files(report):
    md = report["report.md"].read_text()
    first_table = md.index("\n| ")
    assert md.index("## The paper's ablation table, on our arms") < first_table < md.index("## Main results")
    assert md.index("## Pre-registered comparisons") < md.index("## Main results")
    assert "45.4 / 27.8 / 13.27" in md and "equivalent within the margin" in md
    assert "Held-out curves: end value and mean level" in md
    for name in ("prereg.csv", "auc.csv", "ablation.csv", "ablation_direction.csv"):
        assert pd.read_csv(report[name]).shape[0] > 0, name
    verdicts = set(pd.read_csv(report["prereg.csv"])["verdict"])
    assert verdicts == set(VERDICTS)  # all four words appear in this constructed case
    html = report["report.html"].read_text()
    assert "+ alignment" in html and "<td>better" in html.replace("<td style", "<td")


def test_a_report_without_preregistration_is_unchanged(tmp_path):
    plain = frame(prereg=None)
    results.write_parquet_atomic(plain.drop(columns="sweep"), tmp_path / "r" / "results.parquet")
    paths = build_report([tmp_path / "r"], tmp_path / "out")
    md = paths["report.md"].read_text()
    assert "Pre-registered" not in md and "paper's ablation" not in md and "prereg.csv" not in paths


def test_the_documented_example_validates():
    """docs/sweeps.md's example section, on the dense sweep (classify + segment, so miou is
    produced by every arm): it must load as written."""
    import re

    text = (ROOT / "docs" / "sweeps.md").read_text()
    block = text[text.index("## Pre-registration"):]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", block, re.S).group(1))
    raw = yaml.safe_load((ROOT / "sweeps" / "dense_shapes.yaml").read_text())
    raw.update(example)
    cfg = from_dict(raw, "docs/sweeps.md")
    p = cfg.preregistration.resolved(cfg.labels(), cfg.seed_offsets())
    assert p.baseline == "sum_nokd" and p.primary == ("head_acc", "miou")
    assert [(c.arm, c.reference, c.metric) for c in p.triples()] == [
        ("sum", "sum_nokd", "head_acc"), ("sum", "sum_nokd", "miou"), ("genrep", "sum", "head_acc"),
        ("genrep", "sum", "fd_ref"), ("aa", "sum_nokd", "head_acc"), ("aa", "sum_nokd", "miou"),
        ("noisy", "sum_nokd", "head_acc")]
    assert p.pilot.seeds_chosen == p.seeds == 5 and p.seed_offsets == {"aa": 1000}


# ---------------------------------------------------------------- the family as triples, controls
# Arms base (the baseline), kd, kd_self, aa (the A/A control: base's config, seeds 1000–1002) and
# noisy (the positive control) on head_acc ↑, seeds 0–2 (aa: 1000–1002, paired by index):
#   base    [0.70, 0.80, 0.90]
#   kd      [0.74, 0.86, 0.92]   kd − base    = [.04, .06, .02]: d̄ .04, s .02, t 2√3
#   kd_self [0.72, 0.84, 0.90]   kd − kd_self = [.02, .02, .02]: s 0, p 0
#   aa      [0.71, 0.79, 0.90]   aa − base    = [.01, −.01, 0]: d̄ 0, s .01, p 1
#   noisy   [0.40, 0.52, 0.58]   noisy − base = [−.30, −.28, −.32]: d̄ −.3, s .02, t −15√3
# Family (m = 4): kd − base (the shorthand), kd − kd_self (a triple), aa − base, noisy − base.
# Holm: sorted p (0, p_df2(15√3), p_df2(2√3), 1) × (4, 3, 2, 1), running max.
TRIPLE_HEAD = {"base": [0.70, 0.80, 0.90], "kd": [0.74, 0.86, 0.92], "kd_self": [0.72, 0.84, 0.90],
               "aa": [0.71, 0.79, 0.90], "noisy": [0.40, 0.52, 0.58]}
TRIPLE_PREREG = {"primary": ["head_acc"], "baseline": "base", "comparisons": ["kd"],
                 "family": [{"arm": "kd", "reference": "kd_self", "metric": "head_acc"}],
                 "controls": {"aa": "aa", "positive": {"arm": "noisy", "metric": "head_acc",
                                                       "expect": "worse"}},
                 "margins": {"head_acc": 0.01}, "seeds": 3, "seed_offsets": {"aa": 1000}}


def triple_frame(head=None, prereg=None) -> pd.DataFrame:
    """One held-out val evaluation (step 10) per arm × seed, head_acc and a flat sample_acc (0.5
    everywhere: not registered); aa's seeds offset by 1000."""
    head, prereg, rows = head or TRIPLE_HEAD, prereg or TRIPLE_PREREG, []
    for arm, values in head.items():
        for i, v in enumerate(values):
            seed = i + prereg.get("seed_offsets", {}).get(arm, 0)
            cfg = {"strategy": {"name": "sum"}, "variant": arm, "seed": seed, "preregistration": prereg}
            fields = results.trial_fields(cfg, f"{arm}-{seed}", "h", "ok", "", "sha", "{}")
            rows += results.long_rows([{"step": 10, "split": "val", "head_acc": v, "sample_acc": 0.5}],
                                      fields)
    return results.frame(rows).assign(sweep="triples", strategy=lambda d: d["trial"].str.split("-").str[0])


def test_old_form_expands_to_the_same_triples():
    """A stored pre-registration of the old form (baseline, comparisons, primary: no family, no
    controls) loads and expands to each comparison arm × each primary metric against the baseline."""
    from harness.config import Comparison, preregistration_from_dict

    old = {k: v for k, v in PREREG.items()}  # what results before triples stored
    p = preregistration_from_dict(old)
    assert p.triples() == (Comparison("genrep", "sum", "head_acc"), Comparison("genrep", "sum", "fd_ref"),
                           Comparison("pcgrad", "sum", "head_acc"), Comparison("pcgrad", "sum", "fd_ref"))
    explicit = dict(PREREG, comparisons=[], family=[{"arm": c.arm, "reference": c.reference,
                                                     "metric": c.metric} for c in p.triples()])
    q = preregistration_from_dict(explicit)
    assert q.triples() == p.triples() and q.alpha_first() == p.alpha_first() == 0.05 / 4
    a, b = prereg_table(frame(), p), prereg_table(frame(explicit), q)
    pd.testing.assert_frame_equal(a, b)


def test_triples_holm_over_the_family_and_mde_at_alpha_over_m():
    df = triple_frame()
    p = preregistration(df)[0]
    assert [(c.arm, c.reference) for c in p.triples()] == [("kd", "base"), ("kd", "kd_self"),
                                                            ("aa", "base"), ("noisy", "base")]
    t = prereg_table(df, p).set_index(["arm", "reference"])
    kd, kds, aa, noisy = (t.loc[k] for k in [("kd", "base"), ("kd", "kd_self"), ("aa", "base"),
                                             ("noisy", "base")])
    assert kd["p"] == pytest.approx(p_df2(2 * SQ3)) and kds["p"] == 0.0 and aa["p"] == pytest.approx(1.0)
    assert noisy["p"] == pytest.approx(p_df2(15 * SQ3)) and noisy["delta"] == pytest.approx(-0.30)
    assert kds["p_holm"] == 0.0 and noisy["p_holm"] == pytest.approx(3 * p_df2(15 * SQ3))
    assert kd["p_holm"] == pytest.approx(2 * p_df2(2 * SQ3)) and aa["p_holm"] == 1.0
    assert (kd["verdict"], kds["verdict"], aa["verdict"], noisy["verdict"]) == (
        "inconclusive", "better", "inconclusive", "worse")
    # the MDE at α and at α/m = 0.05/4 (m = 4 triples), s_d = 0.02 and 0.01, n = 3
    assert kd["mde"] == pytest.approx(mde_2df(0.05), rel=1e-6)
    assert kd["mde_holm"] == pytest.approx(mde_2df(0.0125), rel=1e-6)  # 0.1309, twice the 0.0653
    assert aa["mde_holm"] == pytest.approx(mde_2df(0.0125, sd=0.01), rel=1e-6)
    assert list(t["role"]) == ["comparison", "comparison", "A/A control", "positive control"]


def test_aa_is_paired_by_index():
    """Seed i + 1000 of the A/A arm meets the baseline's seed i; without the offset no seed is shared."""
    df = triple_frame()
    values = df[df["metric"] == "head_acc"].groupby(["strategy", "sweep", "seed"])["value"].mean()
    both = paired(values, "aa", "base", {"aa": 1000})
    assert both.index.get_level_values("seed").tolist() == [0, 1, 2]
    assert (both["arm"] - both["base"]).tolist() == pytest.approx([0.01, -0.01, 0.0])
    assert paired(values, "aa", "base").empty


def test_controls_pass_and_the_aa_table():
    from harness.report.prereg import aa_table, banner, controls_table, format_controls

    df = triple_frame()
    p = preregistration(df)[0]
    c = controls_table(prereg_table(df, p), p)
    assert c["passed"].all() and banner(c) == []
    assert list(c["expect"]) == ["neither better nor worse", "worse"]
    assert list(format_controls(c)["check"]) == ["passed", "passed"]
    aa = aa_table(df, p)  # every held-out metric: Δ = 0 on sample_acc with no spread, p = 1
    assert aa["metric"].tolist() == ["head_acc", "sample_acc"]
    assert aa["verdict"].tolist() == ["inconclusive", "inconclusive"] and aa["p"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("change, failed", [
    ({"aa": [0.80, 0.91, 0.99]}, "A/A control aa − base on head_acc must be neither better nor worse, "
                                 "and is better"),  # d = [.10, .11, .09]: t = 10√3, p (Holm) 0.0066
    ({"noisy": [0.70, 0.81, 0.89]}, "positive control noisy − base on head_acc must be worse, and is "
                                    "inconclusive"),
])
def test_a_failed_control_opens_the_report(tmp_path, change, failed):
    from harness.report.prereg import control_lines

    df = triple_frame({**TRIPLE_HEAD, **change})
    lines = control_lines(df)
    assert lines == ["CONTROL FAILED: this run cannot be trusted", f"The {failed} (n = 3 paired seeds)."]
    results.write_parquet_atomic(df.drop(columns="sweep"), tmp_path / "triples" / "results.parquet")
    md = build_report([tmp_path / "triples"], tmp_path / "out", baseline="base")["report.md"].read_text()
    head = md.split("\n\n")
    assert head[0].startswith("# genrep-bench report")
    assert head[1] == "## CONTROL FAILED: this run cannot be trusted" and failed in head[2]
    assert md.index("CONTROL FAILED") < md.index("## Pre-registered comparisons") and failed in md
    assert "| FAILED |" in md


def test_controls_without_results_fail():
    """A registered control with no paired seeds cannot vouch for the run."""
    from harness.report.prereg import control_lines

    df = triple_frame({k: v for k, v in TRIPLE_HEAD.items() if k != "noisy"})
    assert control_lines(df)[1].endswith("is inconclusive (n = 0 paired seeds).")


def test_report_with_passing_controls_has_no_banner(tmp_path):
    df = triple_frame()
    results.write_parquet_atomic(df.drop(columns="sweep"), tmp_path / "triples" / "results.parquet")
    paths = build_report([tmp_path / "triples"], tmp_path / "out", baseline="base")
    md = paths["report.md"].read_text()
    assert "CONTROL FAILED" not in md and "### Controls" in md and "A/A arm on every held-out" in md
    assert "kd − kd_self" in md and "[A/A]" in md and "[positive control]" in md
    assert "α/m = 0.0125" in md and "MDE (α/m = 0.0125)" in md
    assert {"controls.csv", "aa.csv"} <= set(paths)


# ---------------------------------------------------------------- the sections: triples, controls, pilot
def controlled(**prereg) -> dict:
    """sweeps/compare.yaml (baseline sum, seeds 0–4) with an A/A and a positive control arm."""
    raw = sweep(**prereg)
    raw["variants"] = {**raw["variants"], "aa": {"strategy": "sum", "seed_offset": 1000},
                       "noisy": {"strategy": "sum", "overrides": {"data.label_noise": 0.4}}}
    raw["preregistration"].setdefault("controls", {"aa": "aa", "positive": {"arm": "noisy"}})
    return raw


def test_controls_and_triples_parse():
    from harness.trial import arm_configs, resolve

    raw = controlled(comparisons=["genrep"], family=[{"arm": "genrep", "reference": "pcgrad",
                                                      "metric": "head_acc"}])
    cfg = from_dict(raw, "sweeps/x.yaml")
    r = cfg.preregistration.resolved(cfg.labels(), cfg.seed_offsets())
    assert r.seed_offsets == {"aa": 1000} and r.controls.positive.expect == "worse"
    assert [(c.arm, c.reference, c.metric) for c in r.triples()] == [
        ("genrep", "sum", "head_acc"), ("genrep", "sum", "fd_ref"), ("genrep", "pcgrad", "head_acc"),
        ("aa", "sum", "head_acc"), ("aa", "sum", "fd_ref"), ("noisy", "sum", "head_acc")]
    assert r.alpha_first() == pytest.approx(0.05 / 6)
    assert cfg.arm("aa", 2).seed == 1002 and cfg.arm("noisy", 2).data.label_noise == 0.4
    params = {"variant": "aa", "seed": 3}
    assert resolve(arm_configs(cfg), params) == resolve(cfg, params) == cfg.arm("aa", 3)
    defaults = from_dict(controlled(), "sweeps/x.yaml")  # comparisons default: not the controls
    assert not {"aa", "noisy", "sum"} & set(defaults.preregistration.resolved(defaults.labels()).comparisons)


@pytest.mark.parametrize("patch, variants, words", [
    ({}, {"aa": {"strategy": "sum", "seed_offset": 1000, "overrides": {"method.beta_kd": 0.0}}},
     "controls.aa: 'aa' differs from the baseline 'sum' in method.beta_kd"),
    ({}, {"aa": {"strategy": "sum"}}, "controls.aa: 'aa' must be a variant with a seed_offset > 0"),
    ({}, {"aa": {"strategy": "sum", "seed_offset": 2}},
     "variants.aa.seed_offset: 2 gives the A/A arm seeds the baseline also runs ([2, 3, 4])"),
    ({}, {"noisy": {"strategy": "sum"}}, "controls.positive.arm: 'noisy' has the baseline's config"),
    ({"comparisons": ["genrep", "noisy"]}, {}, "comparisons[1]: 'noisy' is a control"),
    ({"comparisons": ["genrep"], "family": [{"arm": "genrep", "reference": "sum", "metric": "head_acc"}]},
     {}, "genrep − sum on head_acc is registered twice"),
    ({"family": [{"arm": "genrep", "reference": "nope", "metric": "head_acc"}]}, {},
     "preregistration.family[0].reference: 'nope' is no arm"),
    ({"family": [{"arm": "genrep", "reference": "pcgrad", "metric": "cos"}]}, {},
     "preregistration.family[0].metric: 'cos' is not a held-out metric"),
    ({"controls": {"positive": {"arm": "noisy", "metric": "mc_acc"}}}, {},
     "preregistration.margins.mc_acc: every metric of the family needs"),
    ({"seed_offsets": {"aa": 1000}}, {}, "preregistration.seed_offsets: filled from variants"),
    ({"mde": {"kid_ref": 0.1}}, {}, "preregistration.mde.kid_ref: not a metric of the family"),
    ({"primary": [], "comparisons": ["genrep"], "controls": {}}, {}, "registers no comparison"),
])
def test_bad_controls_and_triples(patch, variants, words):
    raw = controlled(**patch)
    raw["variants"].update(variants)
    with pytest.raises(ConfigError) as e:
        from_dict(raw, "sweeps/x.yaml")
    assert str(e.value).startswith("sweeps/x.yaml: ") and words in str(e.value), str(e.value)


def test_strategies_may_be_empty_when_variants_run():
    raw = controlled()
    raw["strategies"], raw["preregistration"] = [], None
    raw["variants"] = {"aa": {"strategy": "sum", "seed_offset": 1000}}
    assert from_dict(raw, "sweeps/x.yaml").labels() == ("aa",)
    raw["variants"] = {}
    with pytest.raises(ConfigError, match="strategies: empty and no variants"):
        from_dict(raw, "sweeps/x.yaml")


def test_tost_floor_and_seeds_for_margin_by_hand():
    """t_{0.95,4} = 2.131847: with 5 seeds and s_d 0.5 the 90% interval is ±0.4767 wide at Δ = 0."""
    from harness.power import seeds_for_margin, tost_floor

    assert tost_floor(0.5, 5) == pytest.approx(2.131847 * 0.5 / math.sqrt(5), rel=1e-6)
    t95 = 0.9 * math.sqrt(2) / math.sqrt(1 - 0.81)  # t_{.95,2}, closed form (test_tost_cases)
    assert tost_floor(0.02, 3) == pytest.approx(t95 * 0.02 / SQ3)
    n = seeds_for_margin(0.02, 0.01)
    assert tost_floor(0.02, n) < 0.01 <= tost_floor(0.02, n - 1)
    assert math.isnan(tost_floor(0.02, 1))


def pilot_section(**pilot) -> dict:
    return controlled(pilot={"seeds": 3, "paired_sd": {"head_acc": 0.02, "fd_ref": 1.0},
                             "wall_s_per_trial": 35.0, "seeds_chosen": 5,
                             "measured_on": "2026-12-10, test"} | pilot)


def test_a_pilot_block_that_fits_loads():
    """5 seeds: TOST's floors are t_{0.95,4}·s_d/√5 = 2.1318·0.02/√5 = 0.0191 (head_acc) and
    0.953 (fd_ref); margins set from the pilot's spread, above them, load."""
    raw = pilot_section()
    raw["preregistration"]["margins"] = {"head_acc": 0.02, "fd_ref": 1.5}  # floors 0.0191, 0.953
    p = from_dict(raw, "sweeps/x.yaml").preregistration
    assert p.pilot.paired_sd == {"head_acc": 0.02, "fd_ref": 1.0} and p.pilot.seeds_chosen == 5


@pytest.mark.parametrize("margins, pilot, mde, words", [
    # head_acc ±0.01 at s_d 0.02 and 5 seeds: floor 0.0191 ≥ 0.01, never reachable
    ({"head_acc": 0.01, "fd_ref": 1.5}, {}, {},
     "preregistration.margins.head_acc: ±0.01 can never be reached: with 5 seeds and the pilot's "
     "paired SD 0.02, TOST's 90% interval is ±0.0191 wide"),
    ({"head_acc": 0.02, "fd_ref": 1.5}, {"seeds_chosen": 6}, {},
     "pilot.seeds_chosen: 6, but preregistration.seeds registers 5"),
    ({"head_acc": 0.02, "fd_ref": 1.5}, {"paired_sd": {"sample_acc": 0.1}}, {},
     "pilot.paired_sd.sample_acc: not a metric of the family"),
    ({"head_acc": 0.02, "fd_ref": 1.5}, {"paired_sd": {"head_acc": -0.1}}, {},
     "pilot.paired_sd.head_acc: must be a number >= 0"),
    # detecting 0.02 at s_d 0.02 (d = 1) with power 0.8 at α/m = 0.05/5 (genrep on two metrics,
    # the A/A on two, the positive control) needs 16 seeds (exact power 0.835 at 16, 0.797 at 15)
    ({"head_acc": 0.02, "fd_ref": 1.5}, {}, {"head_acc": 0.02},
     "preregistration.mde.head_acc: detecting 0.02 with power 0.8 at α/m = 0.01 needs 16 paired "
     "seeds given the pilot's paired SD 0.02; preregistration.seeds registers 5"),
])
def test_the_pilot_numbers_are_checked(margins, pilot, mde, words):
    raw = pilot_section(**pilot)
    raw["preregistration"].update(margins=margins, mde=mde, comparisons=["genrep"])
    with pytest.raises(ConfigError) as e:
        from_dict(raw, "sweeps/x.yaml")
    assert words in str(e.value), str(e.value)
