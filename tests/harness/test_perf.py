"""``genrep-bench perf --quick`` on a tiny sweep, so the command cannot silently rot.

Real engines, real loader, real spawned ZeRO workers and memory subprocesses; P5 (Ray trials) and
P7 (the smoke sweep) are left out and P3b classifies with an untrained model (``--p3b-steps 0``).
Only the table's shape and that every measured number is positive and finite are checked: timing
thresholds on a shared 2-core machine would be flaky, and the quick figures are not quotable.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.cli import main

pytestmark = pytest.mark.slow
EXPECTED = {"P1", "P2", "P2dp", "P3", "P3b", "P4", "P6"}


def numbers(value):
    """Every number inside a raw entry (nested dicts and lists included)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


def test_perf_quick_writes_a_complete_table(tmp_path, tiny, capsys):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump(tiny()))
    out = tmp_path / "perf"
    # its own process: an earlier test's torch.distributed group (destroyed) stays cached in
    # DeepSpeed's comm module and fails the in-process engines ("Group ... is not registered")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "perf", "--quick", "--repeats", "2",
                           "--sweep", str(sweep), "--out", str(out), "--skip", "P3acc,P5,P7",
                           "--p3b-steps", "0"], capture_output=True, text=True, timeout=600)
    printed = proc.stdout
    assert proc.returncode == 0, printed + proc.stderr[-3000:]

    blob = json.loads((out / "perf.json").read_text())
    rows = blob["rows"]
    assert {r["id"] for r in rows} == EXPECTED
    assert sum(r["id"] == "P2" for r in rows) == 4  # genrep and pcgrad, teacher off and on
    for r in rows:
        assert math.isfinite(r["measured"]) and r["measured"] > 0, r
        assert r["pass"] in (True, False, None), r
        assert all(math.isfinite(v) for v in numbers(r["raw"])), (r["id"], r["raw"])
    step = {r["ratio"]: r for r in rows if r["id"] == "P3"}
    for r in step.values():
        for name in ("sum_off", "sum_kd", "sum_full"):
            if name in r["raw"]:
                assert r["raw"][name]["peak_rss_mb"] > 0 and r["raw"][name]["median_s"] > 0

    # what the alignment adds under data parallelism, counted at the collectives: exactly the
    # two reduce-scatters of the padded task gradients and the Gram all-reduce (harness.step)
    dp = next(r for r in rows if r["id"] == "P2dp")["raw"]
    assert dp["sum"]["collective_bytes_per_step"] > 0  # DeepSpeed's own reduction is counted
    assert dp["extra_collective_bytes_per_step"] == dp["expected_extra_bytes_per_step"]
    assert dp["genrep"]["bytes_by_op"]["reduce_scatter_tensor"] > 0

    meta = blob["meta"]
    env = meta["environment"]
    assert env["torch_threads"] == 1 and env["cpu_model"] and env["versions"]["torch"]
    assert len(meta["load_start"]) == 3 and len(meta["load_end"]) == 3

    with open(out / "perf.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert set(table[0]) == {"id", "ratio", "measured", "target", "pass", "raw", "note"}
    assert (out / "perf.md").read_text().count("\n| P") == len(rows)
    for r in rows:
        assert r["id"] in printed


def test_perf_update_remeasures_one_row_and_keeps_the_others(tmp_path, tiny):
    """--update --only P6: P6 is measured again, every other row of the earlier table is kept
    (its figure unchanged, noted with the earlier run's date), in the table's order."""
    from harness.perf.common import IDS, Row
    from harness.perf.output import write_all

    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump(tiny()))
    out = tmp_path / "perf"
    earlier = [Row("P1", "bare", 1.01, "<=", 1.05, {"x": 1.0}), Row("P6", "old p6", 0.9, "<=", 0.55),
               Row("P3", "full", 22.0, "info", float("nan"))]
    meta = {"environment": {"date": "2026-01-01 00:00:00 UTC", "versions": {}, "cpu_model": "x",
                            "cpus": 2, "torch_threads": 1, "torch_interop_threads": 1},
            "load_start": [0, 0, 0], "load_end": [0, 0, 0], "quick": False, "repeats": 7, "seconds": 1.0}
    write_all(out, earlier, meta)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "perf", "--quick", "--only", "P6",
                           "--update", "--sweep", str(sweep), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = json.loads((out / "perf.json").read_text())["rows"]
    assert [r["id"] for r in rows] == sorted([r["id"] for r in rows], key=IDS.index) == ["P1", "P3", "P6"]
    p1, p3, p6 = rows
    assert p1["measured"] == 1.01 and p1["pass"] is True and "kept from the run of 2026-01-01" in p1["note"]
    assert p3["pass"] is None and p3["target"] == "—"
    assert p6["measured"] == pytest.approx(0.5, abs=0.01) and p6["ratio"] != "old p6" and "kept" not in p6["note"]


def test_perf_rejects_unknown_ids(tmp_path, capsys):
    assert main(["perf", "--only", "P1,P9", "--out", str(tmp_path)]) == 2
    assert "P9" in capsys.readouterr().err


def test_p5_machine_floor_two_trainings(tiny):
    """P5's machine floor runs for real: the trial's training step (a DeepSpeed engine in its own
    gloo group) alone twice, then two processes at once."""
    from harness.config import from_dict
    from harness.perf.common import Settings
    from harness.perf.system import two_trainings

    settings = Settings(sweep=from_dict(tiny()), quick=True)
    got = two_trainings(settings, steps=2)
    assert got["steps"] == 2 and len(got["alone"]) == len(got["together"]) == 2
    walls = [r["wall_s"] for r in got["alone"] + got["together"]]
    assert all(t > 0 for t in walls) and all(r["cpu_s"] > 0 for r in got["alone"] + got["together"])
    assert got["ratio"] == pytest.approx((walls[0] + walls[1]) / max(walls[2:]))


def test_cpu_sampler_roles():
    from harness.perf.system import CpuSampler

    assert CpuSampler.role("ray::RayTrainWorker.run") == "train_workers"
    assert CpuSampler.role("ray::TrainController.run") == "ray_other"
    assert CpuSampler.role("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --x") == "ray_other"
    assert CpuSampler.role("/usr/bin/python -m pytest") == "other"


def test_cpu_sampler_threads():
    """Per-thread CPU from /proc for real, and the Train workers' threads grouped by hand."""
    import os

    from harness.perf.system import CpuSampler

    tick = os.sysconf("SC_CLK_TCK")
    line = f"42 (ray::a (b) c) S 1 2 3 4 5 6 7 8 9 10 {3 * tick} {tick} 0 0"  # utime 3 s, stime 1 s
    assert CpuSampler.stat_cpu(line) == ("ray::a (b) c", 4.0)
    mine = CpuSampler.thread_snapshot(os.getpid())
    assert os.getpid() in mine and all(cpu >= 0 for _, cpu in mine.values())
    sampler = CpuSampler()
    sampler.threads = {(10, 10): ("ray::RayTrainWo", 1.0), (10, 11): ("ray::RayTrainWo", 5.0),
                       (10, 12): ("gloo_tcp_loop", 0.3), (20, 20): ("ray::RayTrainWo", 0.5),
                       (20, 21): ("ray::RayTrainWo", 4.0)}
    assert sampler.worker_threads() == {"busiest": 9.0, "main": 1.5, "other:gloo_tcp_loop": 0.3}


def test_training_intervals_by_hand():
    """Background cores beside the training, from a hand-made sampler timeline: two Train workers
    (pids 1, 2) busy in the middle two of three intervals, every other process 0.2 cores there."""
    from harness.perf.system import training_intervals

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


def test_phase_ratios_by_hand():
    """P5's split: 2 trials of 100 steps, 0.2 s a step alone and 0.25 s together; serial wall
    60 s (40 s of steps, 20 of the rest), concurrent 35 s (25 + 10)."""
    from harness.perf.system import phase_ratios

    got = phase_ratios(60.0, 35.0, 100, [0.2, 0.2], [0.25, 0.24])
    assert got["train_serial_s"] == pytest.approx(40.0) and got["train_concurrent_s"] == pytest.approx(25.0)
    assert got["training_ratio"] == pytest.approx(1.6) and got["rest_ratio"] == pytest.approx(2.0)
    # the mediant: P5 itself lies between the two
    assert got["training_ratio"] <= 60.0 / 35.0 <= got["rest_ratio"]


def test_p5_ray_controls(tiny):
    """For real, on embedded Ray: the sampler's timeline counts a Ray actor started inside the
    block (the other processes' cumulative CPU never decreasing), and the bare two trainings run
    beside idle actors that are gone afterwards."""
    import ray

    from harness.config import from_dict
    from harness.perf.common import Settings
    from harness.perf.system import CpuSampler, IdleActor, two_trainings_beside_actors
    from harness.sweep import init_ray

    init_ray()
    try:
        with CpuSampler(period=0.2) as sampler:
            actor = ray.remote(num_cpus=0)(IdleActor).remote()
            pid = ray.get(actor.pid.remote())
            time.sleep(0.6)
            ray.kill(actor)
        got = two_trainings_beside_actors(Settings(sweep=from_dict(tiny()), quick=True), steps=2, actors=2)
        from ray.util.state import list_actors

        for _ in range(20):  # ray.kill is asynchronous: give the actors a few seconds to die
            alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "IdleActor"]
            if not alive:
                break
            time.sleep(0.5)
    finally:
        ray.shutdown()
    assert pid != os.getpid()
    assert max(n for *_, n in sampler.timeline) >= 1
    rest = [r for _, _, r, _ in sampler.timeline]
    assert rest == sorted(rest) and len(rest) >= 3
    assert got["actors"] == 2 and got["ratio"] > 0 and len(got["together"]) == 2
    assert alive == []


def _engine_in_a_group(raw: dict, port: int, out: str) -> None:
    """In a fresh process (DeepSpeed creates its shm workspace once per process): build a real
    engine inside perf's process group and record whether the workspace file existed then."""
    import torch

    from harness.config import from_dict
    from harness.engine import shm_workspace
    from harness.perf.common import process_group
    from harness.step import Shard, make_step

    cfg = from_dict(raw).trial("sum", 0)
    with process_group(port=port):
        make_step(cfg, Shard(0, 1, cfg.train.batch_size), torch.device("cpu"))
        path = shm_workspace(0)
        seen = path.exists()
    Path(out).write_text(json.dumps({"path": str(path), "seen": seen}))


def test_process_group_removes_deepspeeds_shm_workspace(tmp_path, tiny):
    """DeepSpeed's CPU all-reduce leaves a 67 MB /dev/shm file per process group (never
    unlinked: 302 of them, 20 GB of RAM, had piled up here and got Ray's workers OOM-killed);
    the harness removes its rank's file when the group ends."""
    import multiprocessing

    from harness.perf.common import free_port

    out = tmp_path / "seen.json"
    proc = multiprocessing.get_context("spawn").Process(
        target=_engine_in_a_group, args=(tiny(), free_port(), str(out)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    got = json.loads(out.read_text())
    assert got["seen"], "DeepSpeed made no shm workspace: the test no longer tests the cleanup"
    assert not os.path.exists(got["path"])
