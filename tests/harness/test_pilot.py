"""``genrep-bench pilot`` (harness.pilot): the pilot sweep it derives, the seed count on hand-made
numbers, and (slow) the command end to end on the tiny config."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from harness import results
from harness.cli import main
from harness.config import ConfigError, Loaded, from_dict
from harness.pilot import PILOT_COLUMNS, block, pilot_sweep, size_table
from harness.power import mde_paired, seeds_for_mde, tost_floor


def registered(raw: dict) -> dict:
    """A tiny sweep with a pre-registration: baseline sum, the nokd variant compared on head_acc,
    an A/A and a positive control (m = 3 triples: α/m = 0.05/3)."""
    raw.update(strategies=["sum"], seeds=[0, 1])
    raw["variants"] = {"nokd": {"strategy": "sum", "overrides": {"method.beta_kd": 0.0}},
                       "aa": {"strategy": "sum", "seed_offset": 1000},
                       "noisy": {"strategy": "sum", "overrides": {"data.label_noise": 0.4}}}
    raw["preregistration"] = {"primary": ["head_acc"], "baseline": "sum", "comparisons": ["nokd"],
                              "controls": {"aa": "aa", "positive": {"arm": "noisy"}},
                              "margins": {"head_acc": 0.05}, "mde": {"head_acc": 0.05}, "seeds": 2,
                              "pilot": {"seeds": 2}}
    return raw


def test_the_pilot_is_a_sweep_of_two_arms(tiny, tmp_path):
    raw = registered(tiny())
    pilot = pilot_sweep(Loaded(from_dict(raw, "x.yaml"), raw), n_seeds=3)
    cfg = pilot.config
    assert cfg.labels() == ("sum", "nokd") and cfg.strategies == ("sum",) and cfg.preregistration is None
    assert cfg.seeds == (0, 1, 2)  # the sweep's two seeds, continued
    assert cfg.output_dir == str(tmp_path / "out" / "pilot") and cfg.name == "tiny_pilot"
    assert cfg.data.root == raw["data"]["root"]  # the main run's packed shards and warm start
    assert cfg.arm("nokd", 1).method.beta_kd == 0.0 and cfg.arm("nokd", 1).seed == 1
    # both arms variants: strategies [] runs the variants alone
    raw["variants"] = {"nokd": raw["variants"]["nokd"], "kd": {"strategy": "sum"}}
    raw["strategies"] = []
    raw["preregistration"].update(baseline="nokd", comparisons=["kd"], controls={})
    two = pilot_sweep(Loaded(from_dict(raw, "x.yaml"), raw)).config
    assert two.strategies == () and two.labels() == ("nokd", "kd") and two.seeds == (0, 1)


def test_pilot_without_a_preregistration_is_refused(tiny, tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    assert main(["pilot", str(path)]) == 2
    assert "the pilot sizes a pre-registered comparison" in capsys.readouterr().err


def frame(values: dict[str, list[float]], wall: float = 30.0) -> pd.DataFrame:
    rows = []
    for arm, vs in values.items():
        for seed, v in enumerate(vs):
            fields = results.trial_fields({"strategy": {"name": arm}, "seed": seed}, f"{arm}-{seed}",
                                          "h", "ok", "", "sha", "{}")
            rows += results.long_rows([{"step": 4, "split": "val", "head_acc": v}], fields)
    return results.frame(rows)


def test_the_seed_count_on_hand_made_numbers(tiny):
    """nokd − sum = [.04, .06, .02]: s_d 0.02. Detecting Δ = 0.05 (d = 2.5) with power 0.8 at
    α/m = 0.05/3 needs n seeds where the exact power crosses 0.8 (statsmodels' TTestPower, an
    independent implementation, agrees on both sides); TOST's floor at n is t_{0.95,n−1}·0.02/√n."""
    from statsmodels.stats.power import TTestPower

    raw = registered(tiny())
    p = from_dict(raw, "x.yaml").preregistration
    p = p.resolved(("sum", "nokd", "aa", "noisy"), {"aa": 1000})
    t = size_table(frame({"sum": [0.70, 0.80, 0.90], "nokd": [0.74, 0.86, 0.92]}), p, "nokd", "sum",
                   30.0)
    assert list(t.columns) == PILOT_COLUMNS and len(t) == 1
    r = t.iloc[0]
    assert r["paired_sd"] == pytest.approx(0.02) and r["delta"] == pytest.approx(0.04) and r["n"] == 3
    assert r["alpha_holm"] == pytest.approx(0.05 / 3) and r["m"] == 3 and r["target_from"] == "mde"
    n = int(r["seeds_needed"])
    power = lambda k: TTestPower().power(2.5, k, 0.05 / 3, alternative="two-sided")  # noqa: E731
    assert power(n) >= 0.8 > power(n - 1) and n == seeds_for_mde(0.02, 0.05, 0.05 / 3, 0.8) == 5
    assert r["mde_at_registered"] == pytest.approx(mde_paired(0.02, 2, 0.05 / 3, 0.8))
    assert r["margin_floor"] == pytest.approx(tost_floor(0.02, 5, 0.05))  # 2.1318·0.02/√5 = 0.0191
    assert r["wall_s_per_trial"] == 30.0
    b = block(t, 3)
    assert (b["seeds"], b["paired_sd"], b["wall_s_per_trial"], b["seeds_chosen"]) == (3, {"head_acc": 0.02}, 30.0, 5)
    # without an MDE the margin is the target: 0.05 here too
    p2 = p.__class__(**{**p.__dict__, "mde": {}})
    assert size_table(frame({"sum": [0.70, 0.80, 0.90], "nokd": [0.74, 0.86, 0.92]}), p2, "nokd",
                      "sum", 30.0).iloc[0]["target_from"] == "margin"


def test_a_committed_block_loads_and_a_short_one_is_refused(tiny):
    raw = registered(tiny())
    raw["seeds"] = [0, 1, 2, 3, 4]
    pre = raw["preregistration"]
    pre.update(seeds=5, pilot={"seeds": 3, "paired_sd": {"head_acc": 0.02}, "wall_s_per_trial": 30.0,
                               "seeds_chosen": 5, "measured_on": "test"})
    assert from_dict(raw, "x.yaml").preregistration.pilot.seeds_chosen == 5
    pre.update(mde={"head_acc": 0.04})  # d = 2 at α/m = 0.05/3: 6 seeds
    with pytest.raises(ConfigError, match="needs 6 paired seeds"):
        from_dict(raw, "x.yaml")


@pytest.mark.slow
def test_pilot_end_to_end_on_the_tiny_config(tiny, tmp_path, capsys):
    import ray

    raw = registered(tiny())
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        code = main(["pilot", str(path)])
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert code == 0, printed
    out = tmp_path / "out" / "pilot"
    table = pd.read_csv(out / "pilot.csv")
    assert list(table.columns) == PILOT_COLUMNS and table["metric"].tolist() == ["head_acc"]
    r = table.iloc[0]
    assert (r["arm"], r["reference"], r["n"], r["m"]) == ("nokd", "sum", 2, 3)
    assert r["seeds_needed"] == seeds_for_mde(r["paired_sd"], 0.05, 0.05 / 3, 0.8)
    assert r["wall_s_per_trial"] > 0
    meta = json.loads((out / "pilot.json").read_text())
    assert meta["arms"] == ["sum", "nokd"] and meta["seeds"] == [0, 1]
    assert meta["block"]["seeds_chosen"] == r["seeds_needed"]
    assert sorted(pd.read_csv(out / "trials.csv")["variant"]) == ["nokd", "nokd", "sum", "sum"]
    assert "seeds_chosen" in printed and "paired_sd" in printed and "pilot.csv" in printed
    # the printed block, committed with the seeds it chose and a margin above TOST's floor, loads
    block_ = yaml.safe_load(printed[printed.index("pilot:\n"):printed.index("pilot.csv")])["pilot"]
    n, floor = block_["seeds_chosen"], table.iloc[0]["margin_floor"]
    raw["seeds"] = list(range(n))
    raw["preregistration"].update(seeds=n, pilot=block_,
                                  margins={"head_acc": max(0.05, 1.01 * floor if not math.isnan(floor) else 0)})
    assert from_dict(raw, "reg.yaml").preregistration.pilot.seeds_chosen == n
