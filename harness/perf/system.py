"""P4 loader images/s (PNG decode, 1 thread, ``num_workers: 0``) ÷ P1's step; P5 2 real Ray Tune
trials (``run_sweep``, one embedded Ray): serial ÷ concurrent wall; P6 optimizer-state bytes per
worker, ZeRO-2 ÷ ZeRO-0 (2 spawned gloo processes); P7 the smoke sweep's wall in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from harness.config import apply_overrides, from_dict, load
from harness.data import data_root, load_manifest, load_split, loader_throughput, resolve_dataset
from harness.evaluate import reference_classifier
from harness.perf.common import Row, Settings, load_average, spawn_ranks, synthetic_batch

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "sweeps" / "smoke.yaml"


def p4_row(settings: Settings, step: dict[str, Any]) -> Row:
    data = resolve_dataset(settings.sweep)  # the trials' own dataset, packed with their settings
    if data.manifest is None:
        raise ValueError("P4 times the packed source's loader; data.urls gives no manifest")
    manifest = load_manifest(data.manifest)
    seconds = 1.0 if settings.quick else 3.0
    runs = sorted(loader_throughput(manifest, batch_size=step["batch"], seconds=seconds)
                  for _ in range(1 if settings.quick else 3))
    raw = {"loader_images_per_s": runs[len(runs) // 2], "loader_runs": runs, "seconds_per_run": seconds,
           "step_images_per_s": step["step_images_per_s"],
           "step_images_per_s_default_teacher": step["step_images_per_s_kd"], "batch": step["batch"]}
    return Row("P4", "loader images/s (1 thread, PNG decode) ÷ training step images/s (sum, teacher off)",
               raw["loader_images_per_s"] / step["step_images_per_s"], ">=", 10.0, raw)


def p5_sweep(settings: Settings, out: Path, concurrent: int) -> dict[str, Any]:
    """The base sweep cut to 2 trials of ``p5_steps`` (2 seeds of ``sum``) with ``max_concurrent``."""
    base, steps = settings.sweep.plain(), settings.p5_steps
    return {**base, "name": f"perf-p5-c{concurrent}", "output_dir": str(out / f"c{concurrent}"),
            "strategies": ["sum"], "seeds": [0, 1],
            "data": {**base["data"], "root": str(data_root(settings.sweep))},
            "train": {**base["train"], "steps": steps, "log_every": steps},
            "eval": {**base["eval"], "mc_images": 16, "samples_per_class": 1, "ddim_steps": 4},
            "resources": {**base["resources"], "workers": 1, "max_concurrent": concurrent,
                          "max_failures": 0}}


def warm_reference(settings: Settings) -> None:
    """Train (or load) the cached reference classifier now, so neither timed sweep pays for it."""
    data, split = resolve_dataset(settings.sweep), settings.sweep.eval.split
    reference_classifier(Path(data.cache) / "reference", data.key, *load_split(data.train),
                         *load_split(data.urls(split)), seed=0)


def p5_walls(settings: Settings) -> dict[int, float]:
    """max_concurrent -> wall seconds of the 2-trial sweep, both on one embedded Ray."""
    import ray

    from harness.sweep import init_ray, run_sweep

    walls = {}
    init_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="genrep-perf-p5-") as tmp:
            for c in (1, 2):
                path = Path(tmp) / f"c{c}.yaml"
                path.write_text(yaml.safe_dump(p5_sweep(settings, Path(tmp), c)))
                start = time.perf_counter()
                df = run_sweep(load(path), overwrite=True)
                walls[c] = time.perf_counter() - start
                if not (df["status"] == "ok").all():
                    raise RuntimeError(f"P5: a trial failed (max_concurrent {c})")
    finally:
        ray.shutdown()
    return walls


def p5_row(settings: Settings) -> Row:
    warm_reference(settings)
    load_before, walls = load_average(), p5_walls(settings)
    raw = {"serial_wall_s": walls[1], "concurrent_wall_s": walls[2], "trials": 2,
           "steps_per_trial": settings.p5_steps, "cores": len(os.sched_getaffinity(0)),
           "load_before": load_before, "load_after": load_average()}
    return Row("P5", f"serial ÷ concurrent wall, 2 Ray Tune trials of {settings.p5_steps} steps on 2 cores",
               walls[1] / walls[2], ">=", 1.8, raw)


def _p6_rank(rank: int, world: int, raw: dict) -> dict[str, int]:
    from harness.engine import optimizer_state_bytes
    from harness.step import Shard, make_step

    sweep, result = from_dict(raw), {}
    for zero in (0, 2):
        cfg = apply_overrides(sweep.trial("sum", sweep.seeds[0]), {
            "deepspeed.zero_stage": zero, "method.beta_kd": 0.0, "train.batch_size": 2 * world})
        shard = Shard(rank, world, cfg.train.batch_size // world)
        step_fn = make_step(cfg, shard, torch.device("cpu"))
        step_fn(*(shard.take(v) for v in synthetic_batch(cfg)), 0)  # AdamW's state exists after step 1
        result[f"zero{zero}"] = optimizer_state_bytes(step_fn.net.engine)
    return result


def p6_row(settings: Settings) -> Row:
    ranks = spawn_ranks(_p6_rank, 2, settings.sweep.plain())
    raw = {f"zero{z}_bytes_per_worker": [r[f"zero{z}"] for r in ranks] for z in (0, 2)} | {"workers": 2}
    return Row("P6", "optimizer-state bytes per worker, ZeRO-2 ÷ ZeRO-0 (2 workers)",
               max(raw["zero2_bytes_per_worker"]) / max(raw["zero0_bytes_per_worker"]), "<=", 0.55, raw)


def p7_row() -> Row:
    smoke, raw = load(SMOKE)
    root = str(data_root(smoke))  # the shared cache a real run would use
    with tempfile.TemporaryDirectory(prefix="genrep-perf-p7-") as tmp:
        path = Path(tmp) / "smoke.yaml"
        path.write_text(yaml.safe_dump({**raw, "output_dir": str(Path(tmp) / "smoke"),
                                        "data": {**raw["data"], "root": root}}))
        load_before, start = load_average(), time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", str(path), "--overwrite"],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"P7: the smoke sweep failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return Row("P7", "smoke sweep wall time (minutes)", wall / 60, "<=", 10.0, {
        "wall_s": wall, "load_before": load_before, "load_after": load_average(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
