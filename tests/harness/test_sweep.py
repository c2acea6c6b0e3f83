"""End to end on the real stack: Ray Tune → Ray Train → DeepSpeed → webdataset → results table.

A cut-down smoke sweep (all four strategies, tiny model, a few steps) through the CLI's own code
path; nothing is mocked. The results file's rows and columns are checked.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import results
from harness.cli import main

pytestmark = pytest.mark.slow
STRATEGIES = ["sum", "pcgrad", "genrep", "separate"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from harness.sweep import init_ray

    init_ray()
    yield
    ray.shutdown()


def test_smoke_sweep_end_to_end(tmp_path, tiny, ray_local, capsys):
    raw = tiny(strategies=STRATEGIES)
    raw["strategy_options"] = {"genrep": {"damping": 0.5, "rule": "cos"}}
    raw["deepspeed"] = {"zero_stage": 1}
    raw["eval"] = {**raw["eval"], "every": 2}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw))

    assert main(["sweep", str(path)]) == 0
    df = results.read_results(tmp_path / "out")
    # the embedded cluster runs no preemption watcher (one machine has no node to lose: P5)
    from ray.util.state import list_actors

    ran = {a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False)}
    assert {"TrainController", "RayTrainWorker"} <= ran and "PreemptionWatcher" not in ran

    assert set(results.COLUMNS) <= set(df.columns)
    assert sorted(df["strategy"].unique()) == sorted(STRATEGIES)
    assert (df["status"] == "ok").all()
    train = df[df["split"] == "train"]
    # log_every=2 over 4 steps: rows at steps 2 and 4 for every strategy
    assert sorted(train.groupby("strategy")["step"].unique().map(tuple).unique()) == [(2, 4)]
    for metric in ("loss_gen", "loss_perc", "step_time", "images_per_s", "rss_mb", "mc_evals"):
        assert set(train.loc[train.metric == metric, "strategy"]) == set(STRATEGIES), metric
    # telemetry exists exactly where task gradients are combined
    assert set(train.loc[train.metric == "cos", "strategy"]) == {"pcgrad", "genrep"}
    held = df[df["split"] == "val"]
    # eval.every=2: held-out rows before training (step 0: the untrained model), at 2 and the end
    assert sorted(held.groupby("strategy")["step"].unique().map(sorted).map(tuple).unique()) == [(0, 2, 4)]
    assert set(held.loc[held.step == 0, "metric"]) >= {"head_acc", "sample_acc", "fd_ref"}
    held = held[held["step"] == 4]
    for name in ("samples-step000000.png", "samples-step000002.png", "samples.png"):
        assert len(list((tmp_path / "out").rglob(name))) == len(STRATEGIES), name
    for metric in ("head_acc", "mc_acc", "heldout_loss", "fd_ref", "sample_acc", "head_ece",
                   "head_acc_t50", "head_acc_t150", "head_acc_t300", "noise_sigma_t300"):
        vals = held.loc[held.metric == metric].set_index("strategy")["value"]
        assert set(vals.index) == set(STRATEGIES), metric
        assert vals.notna().all() and (vals.abs() < 1e9).all(), metric
    # robustness (eval.robust_t's defaults): binomial stderr, σ logged beside each t
    assert held.loc[held.metric == "head_acc_t50", "stderr"].notna().all()
    assert held.loc[held.metric == "noise_sigma_t300", "value"].round(3).eq(0.463).all()
    # a trial's wall split: start-up, training (Σ step_time), the final evaluation
    wall = held.pivot_table(index="strategy", columns="metric", values="value")
    assert (wall["startup_s"] > 0).all() and (wall["eval_seconds"] > 0).all()
    steps = train[train.metric == "step_time"].groupby("strategy")["value"].sum()  # 2-step windows
    assert ((wall["train_s"] - 2 * steps).abs() < 1e-6 * wall["train_s"]).all()
    params = held[held.metric == "params_total"].set_index("strategy")["value"]
    assert params["separate"] == 2 * params["sum"]  # two networks: the cost comparison is honest
    assert df.loc[df.metric == "head_acc", "higher_is_better"].all()
    assert not df.loc[df.metric == "fd_ref", "higher_is_better"].any()
    assert pd.Series(df["config_hash"]).str.len().eq(12).all()
    # a second run without --resume/--overwrite refuses to clobber the first
    assert main(["sweep", str(path)]) == 2
    assert "already holds a sweep" in capsys.readouterr().err


def test_a_warm_started_sweep_pretrains_once_and_every_trial_starts_from_it(tmp_path, tiny, ray_local, monkeypatch):
    """init.pretrain: the driver runs the pretrain as a Ray Train job before the trials, caches the
    backbone (save_pretrained) beside the shards with init.json, writes init.json beside the
    results; a second sweep on the same data reuses the cache without training (its fit would
    fail here); a damaged cache is refused naming the field."""
    import json

    import harness.trial
    from harness.config import ConfigError, from_dict
    from harness.data import resolve_dataset
    from harness.warmstart import resolve_init

    raw = tiny(strategies=["sum"], init={"pretrain": {"steps": 3, "seed": 7}})
    path = tmp_path / "warm.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    df = results.read_results(tmp_path / "out")
    assert (df["status"] == "ok").all() and set(df["strategy"]) == {"sum"}
    recorded = json.loads((tmp_path / "out" / "init.json").read_text())
    cache = Path(recorded["dir"])
    assert cache.parent.parent.name == "init" and (cache / "config.json").exists()
    assert recorded["steps"] == 3 and recorded["source"] == "pretrain" and 0 <= recorded["mc_acc"] <= 1
    assert not list(cache.parent.parent.glob(".tmp-*"))  # nothing half-written left behind
    from harness.report import build_report

    md = build_report([tmp_path / "out"], tmp_path / "report")["report.md"].read_text()
    assert f"Warm start (out): pretrain {recorded['key']}, 3 steps from seed 7" in md

    def no_training(*args, **kwargs):
        raise AssertionError("the cached warm start was trained again")

    monkeypatch.setattr(harness.trial, "fit", no_training)
    other = from_dict(tiny(strategies=["genrep"], output_dir=str(tmp_path / "other"),
                           init={"pretrain": {"steps": 3, "seed": 7}}))
    assert resolve_init(other, resolve_dataset(other), str(tmp_path / "ray")) == recorded
    (cache / "config.json").write_text((cache / "config.json").read_text() + " ")
    with pytest.raises(ConfigError, match="init.pretrain: the cached backbone .* does not match"):
        resolve_init(other, resolve_dataset(other), str(tmp_path / "ray"))
