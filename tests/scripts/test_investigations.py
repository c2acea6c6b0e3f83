"""scripts/investigations/: every script imports (so a renamed harness.perf helper it uses fails
here, not months later), has the docstring the directory promises, and the P5 sampler's
arithmetic holds on hand-made input. The scripts themselves take minutes and are not run."""
from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

import pytest

DIR = Path(__file__).resolve().parents[2] / "scripts" / "investigations"
SCRIPTS = sorted(p.stem for p in DIR.glob("*.py"))


@pytest.fixture
def load(monkeypatch):
    monkeypatch.syspath_prepend(str(DIR))  # the scripts import each other by name, as when run
    yield importlib.import_module
    for name in SCRIPTS:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_says_what_it_found(load, name):
    doc = load(name).__doc__
    assert doc and "What it measured" in doc and "Conclusion" in doc and f"investigations/{name}.py" in doc


def test_cpu_sampler_roles(load):
    role = load("p5_cpu_by_role").role
    assert role("ray::RayTrainWorker.run") == "train_workers"
    assert role("ray::TrainController.run") == "ray_other"
    assert role("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --x") == "ray_other"
    assert role("/usr/bin/python -m pytest") == "other"


def test_cpu_sampler_threads(load):
    """Per-thread CPU from /proc for real, and the Train workers' threads grouped by hand."""
    m = load("p5_cpu_by_role")
    tick = os.sysconf("SC_CLK_TCK")
    line = f"42 (ray::a (b) c) S 1 2 3 4 5 6 7 8 9 10 {3 * tick} {tick} 0 0"  # utime 3 s, stime 1 s
    assert m.stat_cpu(line) == ("ray::a (b) c", 4.0)
    mine = m.thread_snapshot(os.getpid())
    assert os.getpid() in mine and all(cpu >= 0 for _, cpu in mine.values())
    sampler = m.CpuSampler()
    sampler.threads = {(10, 10): ("ray::RayTrainWo", 1.0), (10, 11): ("ray::RayTrainWo", 5.0),
                       (10, 12): ("gloo_tcp_loop", 0.3), (20, 20): ("ray::RayTrainWo", 0.5),
                       (20, 21): ("ray::RayTrainWo", 4.0)}
    assert sampler.worker_threads() == {"busiest": 9.0, "main": 1.5, "other:gloo_tcp_loop": 0.3}


def test_training_intervals_by_hand(load):
    """Background cores beside the training, from a hand-made sampler timeline: two Train workers
    (pids 1, 2) busy in the middle two of three intervals, every other process 0.2 cores there."""
    training_intervals = load("p5_cpu_by_role").training_intervals
    timeline = [(0.0, {1: 0.0}, 0.0, 3),
                (1.0, {1: 0.9, 2: 0.1}, 0.5, 5),    # worker 2 still starting: 1 busy worker
                (2.0, {1: 1.8, 2: 1.0}, 0.7, 6),    # both busy (0.9 each), others +0.2
                (4.0, {1: 3.6, 2: 2.8}, 1.1, 6)]    # both busy over 2 s, others +0.4
    got = training_intervals(timeline, workers=2)
    assert got["seconds"] == pytest.approx(3.0)
    assert got["background_cores"] == pytest.approx(0.6 / 3.0)
    assert got["worker_cores"] == pytest.approx((0.9 + 0.9 + 1.8 + 1.8) / 3.0 / 2)
    assert got["ray_actors"] == 6
    one = training_intervals(timeline, workers=1)
    assert one["seconds"] == pytest.approx(1.0) and one["background_cores"] == pytest.approx(0.5)
    assert math.isnan(training_intervals(timeline[:1], workers=1)["background_cores"])


def test_phase_ratios_by_hand(load):
    """P5's split: 2 trials of 100 steps, 0.2 s a step alone and 0.25 s together; serial wall
    60 s (40 s of steps, 20 of the rest), concurrent 35 s (25 + 10)."""
    got = load("p5_cpu_by_role").phase_ratios(60.0, 35.0, 100, [0.2, 0.2], [0.25, 0.24])
    assert got["train_serial_s"] == pytest.approx(40.0) and got["train_concurrent_s"] == pytest.approx(25.0)
    assert got["training_ratio"] == pytest.approx(1.6) and got["rest_ratio"] == pytest.approx(2.0)
    # the mediant: P5 itself lies between the two
    assert got["training_ratio"] <= 60.0 / 35.0 <= got["rest_ratio"]
