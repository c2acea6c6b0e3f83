"""harness.results: the long-format rows (one per trial x step x metric, with its stderr and
direction from the metric registry), the table, and its atomic parquet file."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from harness import results


def test_a_reported_stderr_fills_the_stderr_column():
    """head_acc 0.75 on 4 images, stderr √(0.75·0.25/4) = 0.2165: one row, both filled."""
    fields = results.trial_fields({"strategy": {"name": "sum"}, "seed": 0}, "t", "h", "ok", "", "s", "{}")
    se = math.sqrt(0.75 * 0.25 / 4)
    rows = results.long_rows([{"step": 5, "split": "val", "head_acc": 0.75, "head_acc_stderr": se,
                               "fd_ref": 3.0, "mc_stderr": 0.1}], fields)
    by = {r["metric"]: r for r in rows}
    assert sorted(by) == ["fd_ref", "head_acc", "mc_stderr"]  # no head_acc_stderr row
    assert (by["head_acc"]["value"], by["head_acc"]["stderr"]) == (0.75, pytest.approx(0.21650635))
    assert by["head_acc"]["higher_is_better"] is True
    assert math.isnan(by["fd_ref"]["stderr"])  # none reported
    # mc_stderr is the teacher's own metric ("mc" is no metric), not a stderr column
    assert by["mc_stderr"]["value"] == 0.1 and math.isnan(by["mc_stderr"]["stderr"])
    df = results.frame(rows)
    assert df.loc[df.metric == "head_acc", "stderr"].tolist() == [pytest.approx(se)]


def test_directions_come_from_the_registry():
    from harness.metrics import METRICS, direction

    fields = results.trial_fields({"strategy": {"name": "sum"}, "seed": 0}, "t", "h", "ok", "", "s", "{}")
    rows = results.long_rows([{"step": 1, "split": "train", "cos": 0.1, "step_time": 0.2,
                               "heldout_loss_t50": 0.3, "head_ece": 0.1}], fields)
    assert {r["metric"]: r["higher_is_better"] for r in rows} == {
        "cos": None, "step_time": False, "heldout_loss_t50": False, "head_ece": False}
    assert all(direction(n) is m.higher_is_better for n, m in METRICS.items())


def test_the_registry_refuses_a_name_twice():
    from harness.metrics import Metric, _registry

    with pytest.raises(ValueError, match="'acc' registered twice"):
        _registry(Metric("acc", True), Metric("acc", False))


def test_the_table_round_trips_through_its_atomic_parquet_file(tmp_path):
    fields = results.trial_fields({"strategy": {"name": "sum"}, "seed": 0}, "t", "h", "ok", "", "s", "{}")
    df = results.frame(results.long_rows([{"step": 2, "split": "val", "head_acc": 0.5}], fields))
    path = results.write_parquet_atomic(df, tmp_path / "sweep" / "results.parquet")
    assert list(path.parent.iterdir()) == [path]  # no temporary file left beside it
    back = results.read_results(path)
    pd.testing.assert_frame_equal(back[df.columns].reset_index(drop=True), df.reset_index(drop=True),
                                  check_dtype=False)
