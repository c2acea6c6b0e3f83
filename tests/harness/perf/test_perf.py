"""``genrep-bench perf --quick`` on a tiny sweep, so the command cannot silently rot.

Real engines, real loader, real spawned ZeRO workers and memory subprocesses; P5 (Ray trials) and
P7 (the smoke sweep) are left out and P3b classifies with an untrained model (``--p3b-steps 0``).
The investigations' code (scripts/investigations/) is tested in tests/scripts/.
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
from pathlib import Path

import pytest
import yaml

from harness.cli import main

pytestmark = pytest.mark.slow
EXPECTED = {"P1", "P2", "P2dp", "P3", "P3b", "P3c", "P4", "P6", "P8"}


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
                           "--sweep", str(sweep), "--out", str(out), "--skip", "P5,P7",
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


def test_p3c_picks_the_cheapest_tied_setting_within_a_point_and_says_why():
    """P3c's verdict from its raw numbers (no model): the configured aggregate's cheapest tied
    setting within 1 point of the forward full, free chains never picked; short: how far."""
    from harness.perf.mc import Chain, chain_key, p3c_pick

    def entry(evals, noise_lme, mean_log=0.5):
        return {"noise_lme": noise_lme, "mean_log": mean_log, "x0_lme": 0.1, "evals_per_image": evals,
                "seconds": 1.0, "seeds": 3}

    raw = {"acc_full": 0.82, "evals_per_image_full": 80.0,
           chain_key(Chain(200, 50, 2)): entry(750, 0.83), chain_key(Chain(10, 2, 1)): entry(80, 0.812),
           chain_key(Chain(5, 1, 1)): entry(40, 0.70, mean_log=0.82),
           chain_key(Chain(4, 0, 1, chain="free")): entry(43, 0.9)}
    assert list(raw)[2:] == ["tied_200_50_2", "tied_10_2_1", "tied_5_1_1", "free_4_0_1"]
    ratio, near, note = p3c_pick(raw, 359, "noise_lme")
    assert (ratio, near) == (1.0, True) and "noise_lme, tied_10_2_1" in note and "binomial SE 0.021" in note
    assert "stretch ≤ 0.5 (the paper's claim) not met" in note
    ratio, near, note = p3c_pick(raw, 359, "mean_log")  # another aggregate: its own cheapest
    assert (ratio, near) == (0.5, True) and "mean_log, tied_5_1_1" in note and "met" in note
    # short everywhere: the most accurate within the target's budget (≤ the full's 80), and the
    # most accurate at any cost beside it
    raw[chain_key(Chain(200, 50, 2))] = entry(750, 0.80)
    raw[chain_key(Chain(10, 2, 1))] = entry(80, 0.79)
    ratio, near, note = p3c_pick(raw, 359, "noise_lme")
    assert (ratio, near) == (1.0, False) and "noise_lme at no more evaluations, tied_10_2_1" in note
    assert "short of it by 0.030 (0.020 beyond the 1-point margin)" in note
    assert note.endswith("the most accurate at any cost, tied_200_50_2 (750 evals/image, 3 seed(s)): top-1 "
                         "0.800 vs forward full 0.820 (-0.020; binomial SE 0.021 on 359 images)")
    assert chain_key(Chain(20, 0, 1, start=400, eta=0.5)) == "tied_20_0_1_s400_eta0.5"


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
