"""End to end on the real stack: Ray Tune → Ray Train → DeepSpeed → webdataset → results table.

A cut-down smoke sweep (all four strategies, tiny model, a few steps) through the CLI's own code
path; nothing is mocked. The results file's rows and columns are checked.
"""
from __future__ import annotations

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
    for metric in ("head_acc", "mc_acc", "heldout_loss", "fd_ref", "sample_acc", "head_ece"):
        vals = held.loc[held.metric == metric].set_index("strategy")["value"]
        assert set(vals.index) == set(STRATEGIES), metric
        assert vals.notna().all() and (vals.abs() < 1e9).all(), metric
    params = held[held.metric == "params_total"].set_index("strategy")["value"]
    assert params["separate"] == 2 * params["sum"]  # two networks: the cost comparison is honest
    assert df.loc[df.metric == "head_acc", "higher_is_better"].all()
    assert not df.loc[df.metric == "fd_ref", "higher_is_better"].any()
    assert pd.Series(df["config_hash"]).str.len().eq(12).all()
    # a second run without --resume/--overwrite refuses to clobber the first
    assert main(["sweep", str(path)]) == 2
    assert "already holds a sweep" in capsys.readouterr().err
