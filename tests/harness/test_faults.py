"""Faults injected on purpose: each one is survived or reported, and nothing is lost.

- a results write that crashes half-way (or in the rename) leaves the previous table intact;
- a non-finite loss stops its trial with an error naming the step and the loss;
- (slow, Ray) a Train worker SIGKILLed mid-trial restarts from its last checkpoint and ends with
  bitwise the metrics of an undisturbed run: a two-stage semantic trial killed once in each stage;
- (slow, Ray) a trial whose loss turns NaN fails with the reason and the sweep goes on:
  tests/harness/test_sweep_resume.py, beside the other failing trial.

The fault hooks are environment variables read by harness.worker (GENREP_FAULT_*; see
docs/reliability.md).
"""
from __future__ import annotations

import io
import os

import pandas as pd
import pytest
import torch
import yaml

from harness import results
from harness.results import ResultsError, read_results, write_parquet_atomic
from harness.step import NonFiniteLoss, check_finite

# wall-clock and memory metrics are not expected to repeat
NOT_DETERMINISTIC = {"step_time", "images_per_s", "rss_mb", "eval_seconds", "startup_s", "train_s"}


# ---------------------------------------------------------------- atomic results
def table(value: float) -> pd.DataFrame:
    fields = results.trial_fields({"strategy": {"name": "sum"}, "seed": 0}, "sum-seed0-x", "x" * 12,
                                  "ok", "", "sha", "{}")
    return results.frame(results.long_rows([{"step": 1, "split": "train", "loss_gen": value}], fields))


@pytest.fixture
def previous(tmp_path):
    """A results file from an earlier, good write (loss_gen = 1.0), and its bytes."""
    path = write_parquet_atomic(table(1.0), tmp_path / "results.parquet")
    return path, path.read_bytes()


def assert_untouched(path, before):
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    assert read_results(path)["value"].tolist() == [1.0]


@pytest.mark.parametrize("crash", [RuntimeError, KeyboardInterrupt])
def test_crash_midway_through_the_write_keeps_the_previous_file(previous, monkeypatch, crash):
    path, before = previous
    real = pd.DataFrame.to_parquet

    def half_then_crash(self, f, **kw):
        buf = io.BytesIO()
        real(self, buf, **kw)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise crash("simulated crash while writing")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_crash)
    with pytest.raises(crash, match="simulated"):
        write_parquet_atomic(table(2.0), path)
    assert_untouched(path, before)


def test_crash_in_the_rename_keeps_the_previous_file(previous, monkeypatch):
    path, before = previous

    def no_rename(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="simulated"):
        write_parquet_atomic(table(2.0), path)
    assert_untouched(path, before)


def test_reader_rejects_a_truncated_file_naming_it(previous):
    path, before = previous
    path.write_bytes(before[: len(before) // 2])  # what a non-atomic writer leaves on a crash
    with pytest.raises(ResultsError, match=f"{path}: unreadable results file"):
        read_results(path)
    path.write_bytes(b"")
    with pytest.raises(ResultsError, match=str(path)):
        read_results(path.parent)  # a directory means its results.parquet


def test_a_long_error_keeps_its_root_cause_for_the_table():
    """Ray wraps a worker's exception in a long traceback; the cause is its last line."""
    wrapped = RuntimeError("\x1b[36mray::train()\x1b[39m\n" + "  File ...\n" * 500
                           + "harness.step.NonFiniteLoss: step 2: non-finite loss_gen")
    text = results.error_text(wrapped)
    assert len(text) <= 2000 and "\x1b" not in text
    assert text.startswith("RuntimeError: ray::train()")
    assert text.endswith("NonFiniteLoss: step 2: non-finite loss_gen")
    assert results.error_text(None) == ""


# ---------------------------------------------------------------- non-finite losses
@pytest.mark.parametrize("bad, name", [("loss_gen", "loss_gen"), ("loss_perc", "loss_perc")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_names_the_step_and_the_loss(bad, name, value):
    losses = {"loss_perc": torch.tensor(0.5), "loss_gen": torch.tensor(0.25)} | {bad: torch.tensor(value)}
    with pytest.raises(NonFiniteLoss, match=rf"step 7: non-finite {name} \(on this rank: {name} = "):
        check_finite(7, **losses)
    check_finite(7, loss_perc=torch.tensor(0.5), loss_gen=torch.tensor(0.25))  # finite: silent


def test_both_losses_non_finite_are_both_named():
    with pytest.raises(NonFiniteLoss, match="non-finite loss_perc and loss_gen"):
        check_finite(0, loss_perc=torch.tensor(float("nan")), loss_gen=torch.tensor(float("inf")))


# ---------------------------------------------------------------- Ray: kill and NaN (slow)
def run_sweep_with(tmp_path, tiny, monkeypatch, name: str, env: dict[str, str], **sections):
    """run_sweep on a fresh embedded cluster started with ``env`` set: every Ray process inherits it.

    The sweep path, not run_single: under Ray Train V2 a TorchTrainer's own Result keeps only the
    metrics attached to retained checkpoints, while Tune receives every report."""
    import ray

    from harness.config import load
    from harness.sweep import init_ray, run_sweep

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    raw = tiny(**sections)
    raw["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    ray.shutdown()
    init_ray()
    try:
        run_sweep(load(path))
    finally:
        ray.shutdown()
        for key in env:
            monkeypatch.delenv(key)
    return read_results(tmp_path / name)  # the table on disk, not a returned frame


def comparable(df: pd.DataFrame) -> pd.Series:
    """value by (arm, step, split, metric) for the metrics that must repeat, the last report winning.

    NaN values are the metrics a report did not carry (Tune's table is the union of all reports)."""
    df = df[~df["metric"].isin(NOT_DETERMINISTIC) & df["value"].notna()]
    return df.groupby(["strategy", "step", "split", "metric"])["value"].last()


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_to_identical_metrics(tmp_path, tiny, monkeypatch):
    """Under Tune the dead attempt fails the trial; Tune retries it (resources.max_failures) and
    the new TorchTrainer, same run name and storage, restores the run's latest checkpoint.

    One ``genrep`` trial in two stages with semantic-driven generation (issue 21), the richest
    state a trial has (engine, EMA teacher, calibrated tau, strategy state, loader position, the
    semantic copy, the running means), run twice side by side in one sweep and one of the two
    killed twice: before step 5, in stage 1 (it resumes from the step-4 checkpoint, before the
    switch at 6 makes the semantic copy), and before step 10, in
    stage 2 (from the step-8 checkpoint, which holds it); its held-out loss and samples read that
    copy (tests/harness/test_step_semantic.py compares the weights). One-stage arms resume
    through the same code (in process: tests/harness/test_worker.py).
    """
    sections = dict(strategies=["genrep"], variants={"killed": {"strategy": "genrep"}},
                    train={"steps": 12, "log_every": 2, "checkpoint_every": 4, "stage1_steps": 6},
                    method={"semantic": {"enabled": True, "rep_align": 0.5, "ema_decay": 0.9}},
                    resources={"max_failures": 2}, data={"shuffle_buffer": 32})
    # one sweep, two arms of one configuration side by side: `genrep` undisturbed (the reference)
    # and `killed`, the only one the hook kills (its label is the filter)
    df = run_sweep_with(tmp_path, tiny, monkeypatch, "faults",
                        {"GENREP_FAULT_KILL_AT_STEP": "5,10:killed"}, **sections)
    clean, killed = df[df["strategy"] == "genrep"], df[df["strategy"] == "killed"]

    markers = list((tmp_path / "faults" / "ray").rglob("genrep-fault-kill-*"))
    assert sorted(m.name.rsplit("-step", 1)[1] for m in markers) == ["10", "5"], \
        "the kill hook did not fire before each step of the killed arm (and only there)"
    # Tune keeps the dead attempt's reports; a restart from scratch would report step 2 again
    first = killed[(killed["metric"] == "loss_perc") & (killed["split"] == "train")]
    assert (first["step"] == 2).sum() == 1, first
    assert (clean["status"] == "ok").all() and (killed["status"] == "ok").all(), killed["error"].iloc[0]
    stage = clean[clean["metric"] == "stage"].groupby("step")["value"].last()
    assert stage[4] == 1 and stage[8] == 2 and "loss_vlb" in set(clean["metric"])
    # every value, the final mc_evals included: the run's running means (harness.worker's
    # `timed`) are checkpointed, so a resumed trial still averages stage 1's teacher-free steps
    a, b = comparable(clean), comparable(killed.assign(strategy="genrep"))
    assert (a.index.get_level_values("split") == "val").sum() > 10 and b.index.equals(a.index)
    pd.testing.assert_series_equal(a, b, rtol=0, atol=1e-6)  # held-out metrics and every report
    assert (a == b).all(), (a[a != b], b[a != b])  # and in fact bitwise
