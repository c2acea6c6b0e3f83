"""A sweep: Ray Tune trials over strategies × seeds, each a Ray Train job; results to one table.

``run_sweep`` finds a Ray cluster (``--address`` or ``RAY_ADDRESS``) or starts an embedded local
one, packs the data on first use, runs the Tuner (or restores it with ``resume``), and writes
``<output_dir>/results.parquet`` atomically from what every trial reported.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness import results
from harness.config import ConfigError, SweepConfig, load
from harness.trial import prepare_data, run_trial, trial_name

log = logging.getLogger("harness")
EXPERIMENT = "tune"


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Connect to a cluster, or start Ray embedded (dashboard off, listening on 127.0.0.1).

    Token authentication stays on (Ray's default in this release): Ray's gRPC servers listen on
    all interfaces, and the token is what keeps other hosts out.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    quiet = {"logging_level": logging.INFO if verbose else logging.WARNING,
             "log_to_driver": verbose}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
    else:
        # The dashboard (bound to 127.0.0.1) serves the state API that Ray Train V2 needs to
        # clean up the placement groups of finished trials; without it they leak and later
        # trials time out waiting for CPUs.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", **quiet)


def experiment_dir(cfg: SweepConfig) -> Path:
    return Path(cfg.output_dir).resolve() / "ray" / EXPERIMENT


def raw_config(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text()) or {}


def make_tuner(cfg: SweepConfig, raw: dict[str, Any], resume: bool):
    from ray import tune

    urls = prepare_data(cfg)
    storage = str(Path(cfg.output_dir).resolve() / "ray")
    fn = tune.with_parameters(run_trial, sweep={"raw": raw, "file": cfg.source_file}, urls=urls,
                              storage=storage)
    trainable = tune.with_resources(fn, {"cpu": 0.01})  # the driver only waits on its trainer
    exp = experiment_dir(cfg)
    if resume and tune.Tuner.can_restore(str(exp)):
        log.warning("resuming %s: finished trials are kept, the rest run", exp)
        return tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True)
    param_space = {"strategy": tune.grid_search(list(cfg.strategies)),
                   "seed": tune.grid_search(list(cfg.seeds))}
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage, verbose=1,
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures)))


def collect(grid, cfg: SweepConfig) -> pd.DataFrame:
    """Long rows from every trial of a ResultGrid; a failed trial keeps its rows and its error."""
    sha, vers = results.git_sha(), results.versions()
    rows: list[dict[str, Any]] = []
    for res in grid:
        trial = cfg.trial(res.config["strategy"], int(res.config["seed"]))
        status = "failed" if res.error else "ok"
        error = "" if not res.error else f"{type(res.error).__name__}: {res.error}"[:2000]
        fields = results.trial_fields(trial.to_dict(), trial_name(trial), trial.hash(), status,
                                      error, sha, vers)
        history = res.metrics_dataframe.to_dict("records") if res.metrics_dataframe is not None else []
        trial_rows = results.long_rows(history, fields)
        if status == "failed":
            trial_rows.append({**fields, "step": -1, "split": "status", "metric": "failed",
                               "value": 1.0, "stderr": float("nan"), "higher_is_better": False})
        rows.extend(trial_rows)
    return results.frame(rows)


def run_sweep(path: str | Path, resume: bool = False, overwrite: bool = False,
              address: str | None = None, verbose: bool = False) -> pd.DataFrame:
    cfg = load(path)
    exp = experiment_dir(cfg)
    if exp.exists() and not (resume or overwrite):
        raise ConfigError(f"{path}: output_dir: {exp} already holds a sweep; pass --resume to "
                          "finish it or --overwrite to start again")
    if overwrite and exp.exists():
        shutil.rmtree(exp.parent)
    init_ray(address, verbose)
    start = time.perf_counter()
    grid = make_tuner(cfg, raw_config(path), resume).fit()
    df = collect(grid, cfg)
    out = results.write_parquet_atomic(df, Path(cfg.output_dir) / "results.parquet")
    log.warning("sweep %s: %d trials, %d rows -> %s (%.0f s)", cfg.name, len(grid), len(df), out,
                time.perf_counter() - start)
    return df


def run_single(path: str | Path, strategy: str, seed: int | None = None,
               address: str | None = None, verbose: bool = False) -> pd.DataFrame:
    """One trial through Ray Train, without Tune (``genrep-bench train``), for debugging."""
    from harness.trial import fit

    cfg = load(path)
    trial = cfg.trial(strategy, cfg.seeds[0] if seed is None else seed)
    if strategy not in cfg.strategies and strategy != "separate":
        from genrep import strategies

        strategies.get(strategy)  # an unknown name raises, listing the known ones
    init_ray(address, verbose)
    storage = str(Path(cfg.output_dir).resolve() / "ray")
    res = fit(trial, prepare_data(cfg), storage, f"single-{trial_name(trial)}", in_tune=False)
    fields = results.trial_fields(trial.to_dict(), trial_name(trial), trial.hash(),
                                  "failed" if res.error else "ok", str(res.error or ""),
                                  results.git_sha(), results.versions())
    history = res.metrics_dataframe.to_dict("records") if res.metrics_dataframe is not None else []
    return results.frame(results.long_rows(history, fields))
