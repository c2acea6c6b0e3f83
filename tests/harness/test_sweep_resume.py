"""Resume and failure semantics of a sweep, on the real stack, through the CLI in a subprocess.

- A sweep whose driver is SIGKILLed (with its embedded Ray) after the first trial finished is
  finished by ``--resume``: the finished trial is not run again, the others run, and every
  (strategy, seed) ends with exactly one set of rows.
- A trial that raises (a batch larger than its split) or whose loss turns non-finite (the NaN
  fault hook, GENREP_FAULT_NAN_AT_STEP) is attempted 1 + resources.max_failures times, then
  recorded as failed with its error and what it reported before; the sweep goes on, and the CLI
  exits non-zero naming it.

Both in one sweep (one test): each Ray start-up and trial here costs seconds of a 2-core CI.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import results
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def command(path: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "sweep", str(path), *flags]


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def finished_in_state(exp: Path) -> list[str]:
    """Trial ids that Tune's last saved experiment state records as TERMINATED."""
    done = []
    for state in exp.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (json.JSONDecodeError, OSError):  # being rewritten right now
            continue
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                done.append(trial["trial_id"])
    return done


def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited (rc {proc.returncode}) before {what}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_sweep_resumes_and_failing_trials_are_retried_then_recorded(tmp_path, tiny):
    """One sweep, one trial at a time: `sum` finishes, then the driver and its Ray are SIGKILLed;
    ``--resume`` keeps `sum` (its result is not rewritten) and runs the rest, where `broken` asks
    for a batch larger than the training split (the worker raises every time) and `genrep` gets an
    all-NaN batch at step 2 on every attempt (the fault hook): each is attempted 1 +
    resources.max_failures times and recorded as failed with its error and what it reported
    before; the sweep goes on and exits non-zero naming them."""
    raw = tiny(strategies=["sum", "genrep"], resources={"max_concurrent": 1, "max_failures": 1},
               variants={"broken": {"strategy": "sum", "overrides": {"train.batch_size": 4096}}},
               grid={"method.beta_kd": [0.5]})
    path = write(tmp_path, raw)
    env = {**os.environ, "GENREP_FAULT_NAN_AT_STEP": "2:genrep"}
    exp = Path(raw["output_dir"]) / "ray" / "tune"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(command(path), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group: the driver and its Ray
    try:
        first = wait_for(lambda: finished_in_state(exp), 600, proc, "a finished trial")
        os.killpg(proc.pid, signal.SIGKILL)  # a crash, not a polite Ctrl-C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert len(first) == 1, first
    assert not (Path(raw["output_dir"]) / "results.parquet").exists()  # it really was interrupted
    done_dir = next(d for d in exp.iterdir() if d.name.startswith(f"run_trial_{first[0]}"))
    assert json.loads((done_dir / "params.json").read_text())["variant"] == "sum"  # trials in order
    done_results = (done_dir / "result.json").read_text()

    run = subprocess.run(command(path, "--resume"), cwd=ROOT, text=True, capture_output=True,
                         timeout=900, env=env)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-3000:]
    assert (done_dir / "result.json").read_text() == done_results  # the finished trial did not run
    assert "FAILED trial broken-seed0-" in run.stderr and "FAILED trial genrep-seed0-" in run.stderr
    trials = pd.read_csv(Path(raw["output_dir"]) / "trials.csv").set_index("variant")
    assert trials.loc["sum", "status"] == "ok" and trials.loc["sum", "attempts"] == 1
    for failed in ("broken", "genrep"):
        assert trials.loc[failed, "status"] == "failed" and trials.loc[failed, "attempts"] == 2
    assert (trials["params"] == "method.beta_kd=0.5").all()

    df = results.read_results(raw["output_dir"])
    assert df.groupby(["strategy", "seed"])["trial"].nunique().to_dict() == {
        ("broken", 0): 1, ("genrep", 0): 1, ("sum", 0): 1}
    # exactly one set of rows: each (trial, step, split, metric) once, the final report included
    assert not df.duplicated(["trial", "step", "split", "metric"]).any()
    ok = df[df["strategy"] == "sum"]
    assert (ok["status"] == "ok").all() and set(ok["split"]) == {"train", "val"}
    assert sorted(ok.loc[ok["split"] == "train", "step"].unique()) == [2, 4]
    assert (ok["metric"] == "head_acc").sum() == 1
    bad = df[df["strategy"] == "broken"]
    assert set(bad["status"]) == {"failed"} and "no full batch" in bad["error"].iloc[0]
    assert json.loads(bad["config"].iloc[0])["strategy"]["name"] == "sum"  # label vs strategy run
    assert ((bad["split"] == "status") & (bad["metric"] == "failed")).sum() == 1
    nan = df[df["strategy"] == "genrep"]
    assert set(nan["status"]) == {"failed"}
    error = nan["error"].iloc[0]
    assert "NonFiniteLoss" in error and "step 2: non-finite loss_perc" in error, error
    assert ((nan["split"] == "status") & (nan["metric"] == "failed")).sum() == 1
    assert 2 in set(nan.loc[nan["split"] == "train", "step"])  # what it reported before is kept


def test_resume_refuses_arms_whose_resolved_config_changed(tmp_path, tiny, caplog):
    """The same file on code with other defaults resolves to other trials: --resume refuses it,
    naming the arm and its config hashes (the finished trials ran another method), while an
    unchanged sweep resumes; a sweep started before arms.json existed resumes with a warning."""
    import dataclasses

    from harness.config import ConfigError, from_dict
    from harness.sweep import check_same_sweep, experiment_dir

    raw = tiny()
    cfg = from_dict(raw)
    check_same_sweep(cfg, raw, resume=False)
    arms = experiment_dir(cfg).parent / "arms.json"
    assert json.loads(arms.read_text()) == {a: cfg.arm(a, 0).hash() for a in ("sum", "genrep")}
    check_same_sweep(cfg, raw, resume=True)  # nothing changed
    # a default that moved (here by hand: the method's beta_kd) under the same file
    moved = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, beta_kd=0.5))
    with pytest.raises(ConfigError, match=r"resolved config of arm\(s\) \['genrep', 'sum'\] changed"):
        check_same_sweep(moved, raw, resume=True)
    arms.unlink()
    check_same_sweep(moved, raw, resume=True)
    assert "no arms.json" in caplog.text and arms.exists()
