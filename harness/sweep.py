"""A sweep: Ray Tune trials, each a Ray Train job; results to one table.

The trials are a grid (strategies and named variants × seeds × the ``grid:`` values) or an Optuna
search (harness.search). ``run_sweep`` finds a Ray cluster (``--address`` or ``RAY_ADDRESS``) or
starts an embedded local one, packs the data on first use, runs the Tuner (or, with ``resume``,
restores it: finished trials are kept and never rerun, unfinished and errored ones run), and
writes ``<output_dir>/results.parquet`` atomically from what every trial reported.

Where results go (:func:`resolve_output`): an absolute ``output_dir`` as written; a relative one
under the storage root (``--storage`` or ``GENREP_STORAGE``) when one is given; otherwise under
the current directory, except on a cluster the sweep joined (a Ray job, ``--address``,
``RAY_ADDRESS``): there the current directory is a Ray job's temporary copy of its working dir,
deleted with the cluster, so the sweep refuses before training. ``report`` and ``--resume`` use
the same resolution.

Failures: a trial that raises is attempted ``1 + resources.max_failures`` times (each attempt
resumes from the trial's latest Ray Train checkpoint), then recorded with status ``failed`` and
its error, and the sweep goes on. Trial statuses in the results: ok, failed, stopped (early, by
ASHA), unfinished (the sweep was interrupted: finish it with ``--resume``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd

from harness import atomic, results, warmstart
from harness.config import ConfigError, Loaded, SweepConfig, TrialConfig
from harness.data import resolve_dataset
from harness.ports import free_port
from harness.trial import arm_configs, resolve, run_trial, trial_name

log = logging.getLogger("harness")
EXPERIMENT = "tune"


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Connect to a cluster, or start Ray embedded (dashboard on 127.0.0.1).

    Token authentication stays on (Ray's default in this release): Ray's gRPC servers listen on
    all interfaces, and the token is what keeps other hosts out.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # A loaded 2-core machine can take over a minute to start a Train worker (torch, deepspeed
    # and diffusers imports); Ray Train's default 60 s start-up timeout then retries in a loop.
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S":
           os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")}
    quiet = {"logging_level": logging.INFO if verbose else logging.WARNING,
             "log_to_driver": verbose, "runtime_env": {"env_vars": env}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
    else:
        # One machine has no other node to lose: Ray Train's preemption watcher (an actor per
        # trial polling for node preemption notices) only costs a process start, ~1.5 CPU-s a
        # trial (docs/performance.md, P5). A cluster keeps it.
        other_ray_note(_gcs_addresses())
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get(
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Every process of this cluster is told its address: Ray's state API, which Ray Train
        # V2's placement-group cleaner calls with no address, otherwise finds "its" cluster by
        # grepping ``ps`` and fails when another Ray instance runs on the machine; the trial's
        # workers' placement group then leaks and later trials stall (docs/sweeps.md, "One Ray
        # instance per machine"). So the GCS port is chosen here rather than by Ray.
        port = free_port()
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        # The dashboard (bound to 127.0.0.1) serves the state API that Ray Train V2 needs to
        # clean up the placement groups of finished trials; without it they leak and later
        # trials time out waiting for CPUs.
        # address="local": a new cluster even when another one on this machine is recorded in
        # /tmp/ray/ray_current_cluster (plain ray.init() would silently join that one).
        saved = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray._private.node at start-up
        try:
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", **quiet)
        finally:
            if saved is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = saved


def _gcs_addresses() -> list[str]:
    """The GCS addresses of the Ray instances running on this machine (Ray greps ``ps``)."""
    from ray._private import services

    return sorted(services.find_gcs_addresses())


def other_ray_note(addresses: list[str]) -> str | None:
    """Log (and return) a note when other Ray instances run on this machine. Harmless since the
    embedded cluster tells its processes its own address (``init_ray``), but they share the
    machine's cores, which slows trials and skews timings."""
    if not addresses:
        return None
    text = (f"{len(addresses)} other Ray instance(s) run on this machine ({', '.join(addresses)}): "
            "they share its cores, so trials run slower and timings are skewed "
            "(docs/sweeps.md, \"One Ray instance per machine\")")
    log.info(text)
    return text


# ---------------------------------------------------------------- where results go
STORAGE_ENV = "GENREP_STORAGE"


def in_ray_job() -> bool:
    """True in a Ray job's driver: the job supervisor sets ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and runs
    the entrypoint in a temporary copy of ``--working-dir`` under the session's
    ``runtime_resources/`` (gone when the cluster stops)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "runtime_resources" in Path.cwd().parts


def storage_root(storage: str | None = None) -> Path | None:
    """``--storage`` or ``GENREP_STORAGE``: an absolute directory that outlives the job."""
    root = storage or os.environ.get(STORAGE_ENV)
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"--storage / {STORAGE_ENV}: {root!r} must be an absolute path (a "
                          "directory every node can reach, e.g. a shared filesystem)")
    return path


def under_storage(path: str | Path, storage: str | None = None) -> Path:
    """A results path as the sweep resolved it: absolute as given, relative under the storage root
    when there is one, else under the current directory."""
    path, root = Path(path).expanduser(), storage_root(storage)
    return path if path.is_absolute() or root is None else root / path


def resolve_output(cfg: SweepConfig, storage: str | None = None,
                   address: str | None = None) -> SweepConfig:
    """The sweep with ``output_dir`` made absolute, or a ConfigError before anything runs when a
    relative one would land in a Ray job's temporary directory (or on a cluster's other nodes)."""
    out = Path(cfg.output_dir).expanduser()
    if not out.is_absolute() and storage_root(storage) is None and (
            in_ray_job() or address or os.environ.get("RAY_ADDRESS")):
        where = "inside a Ray job" if in_ray_job() else "on a Ray cluster it joined"
        raise ConfigError(
            f"{cfg.source_file}: output_dir: {cfg.output_dir!r} is relative and this sweep runs "
            f"{where}: results would be written under {Path.cwd()}, which a Ray job deletes with "
            f"the cluster. Set {STORAGE_ENV} (ray job submit --runtime-env-json "
            f"'{{\"env_vars\": {{\"{STORAGE_ENV}\": \"/shared/path\"}}}}'), pass --storage "
            "/shared/path, or make output_dir absolute")
    if out.is_absolute() or storage_root(storage) is None:
        return cfg  # as written (a local relative path stays relative: same trial hashes as ever)
    return replace(cfg, output_dir=str(under_storage(out, storage)))


def experiment_dir(cfg: SweepConfig) -> Path:
    return Path(cfg.output_dir).resolve() / "ray" / EXPERIMENT


# ---------------------------------------------------------------- the Tuner
def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's params per trial: ``variant`` (a strategy or a named variant), ``seed`` and the
    dotted-path ``overrides`` (grid values here; a search's searcher adds its own and the seed)."""
    from ray import tune

    if cfg.search:
        return {"variant": cfg.strategies[0]}
    space = {"variant": tune.grid_search(list(cfg.labels())), "seed": tune.grid_search(list(cfg.seeds))}
    if cfg.grid:
        space["overrides"] = {p: tune.grid_search(list(v)) for p, v in cfg.grid.items()}
    return space


def tune_config(cfg: SweepConfig):
    from ray import tune

    if not cfg.search:
        return tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent)
    from harness import search

    return tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent,
                           search_alg=search.searcher(cfg), scheduler=search.scheduler(cfg),
                           num_samples=search.num_trials(cfg))


def trial_log():
    """A Tune callback: one line per trial start and end (variant, seed, wall time, status).

    The trial's own log lines run in Ray worker processes whose output is not forwarded unless
    --verbose, so the driver prints these.
    """
    from ray.tune import Callback

    class TrialLog(Callback):
        def __init__(self):
            self.started: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.perf_counter()
            log.warning("trial start: %s seed=%s", trial.config.get("variant"), trial.config.get("seed"))

        def _end(self, trial, status: str):
            wall = time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter())
            log.warning("trial end: %s seed=%s %s wall=%.0fs", trial.config.get("variant"),
                        trial.config.get("seed"), status, wall)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "ok")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "failed")

    return TrialLog()


def make_tuner(cfg: SweepConfig, resume: bool):
    from ray import tune

    dataset, storage = resolve_dataset(cfg), str(Path(cfg.output_dir).resolve() / "ray")
    init = warmstart.resolve_init(cfg, dataset, storage)  # trained once here, before any trial
    warmstart.record(init, cfg.output_dir)
    data = dataset.plain()  # plain: the Tune trainable only passes it on
    # validated here, once: each trial gets its arm's resolved config, never the sweep file
    fn = tune.with_parameters(run_trial, arms=arm_configs(cfg), data=data, storage=storage,
                              init_dir=init["dir"] if init else None)
    trainable = tune.with_resources(fn, {"cpu": 0.01})  # the driver only waits on its trainer
    if cfg.search:
        # train rows carry acc (ASHA's metric), the final row the held-out objectives: no row has
        # them all, and Tune's strict check would fail the first train row
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    exp = experiment_dir(cfg)
    if resume and tune.Tuner.can_restore(str(exp)):
        # the same trainable (run_trial) as the first run; a search's searcher and its Optuna
        # study come back from the experiment state (and the SQLite file it points to)
        log.warning("resuming %s: finished trials are kept, the rest run", exp)
        return tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable, param_space=param_space(cfg), tune_config=tune_config(cfg),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage, verbose=1, callbacks=[trial_log()],
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures)))


# ---------------------------------------------------------------- results of a ResultGrid
def tune_trials(grid) -> list:
    """Tune's Trial objects (status, failure count), aligned with the grid's results. ResultGrid
    has no public accessor for them; its results are built from this same list, in order."""
    analysis = getattr(grid, "_experiment_analysis", None)
    return list(analysis.trials) if analysis is not None else [None] * len(grid)


def saved_statuses(exp: Path) -> dict[str, str]:
    """trial_id -> status in Tune's last saved experiment state. After a Ctrl-C, Tune saves the
    state (interrupted trials PENDING or RUNNING) and then, cleaning up, marks its in-memory
    trials TERMINATED, as if they had ended. Empty when the file cannot be read."""
    states = sorted(exp.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    try:
        data = json.loads(states[-1].read_text()) if states else {}
        return {t["trial_id"]: t["status"] for t in (json.loads(raw) for raw, _ in data.get("trial_data", []))}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def trial_status(res, trial: TrialConfig, tune_trial, saved: dict[str, str]) -> str:
    """ok (final held-out report present), failed, stopped (early, by a scheduler) or unfinished."""
    if res.error:
        return "failed"
    if (res.metrics or {}).get("split") == trial.eval.split:
        return "ok"
    status = saved.get(getattr(tune_trial, "trial_id", None), getattr(tune_trial, "status", "PENDING"))
    return "stopped" if status == "TERMINATED" else "unfinished"


def history(res) -> list[dict[str, Any]]:
    """The trial's reports; where a step was reported twice (an attempt that restarted from an
    earlier checkpoint, or a resumed sweep), the last report wins, so each step appears once.
    The frame is the union of every report's keys: a NaN there is a metric this report did not
    carry (head_acc in a train row), so it is dropped rather than written as a row."""
    df = res.metrics_dataframe
    if df is None or df.empty:
        return []
    if {"step", "split"} <= set(df.columns):
        df = df.drop_duplicates(["step", "split"], keep="last")
    reports = ({k: v for k, v in rep.items() if not (isinstance(v, float) and math.isnan(v))}
               for rep in df.to_dict("records"))
    return [rep for rep in reports if "step" in rep]


def attempts(tune_trial, status: str) -> int:
    """Runs of a trial: every failure counts one, plus the run that succeeded (or still runs)."""
    failures = getattr(tune_trial, "num_failures", 0)
    return failures + (status != "failed")


def trial_rows(res, cfg: SweepConfig, tune_trial, saved: dict[str, str], sha: str,
               vers: str) -> tuple[list[dict], dict]:
    """Long result rows of one trial and its line in the end-of-sweep table."""
    params = res.config or tune_trial.config  # a trial that never reported has no Result config
    trial = resolve(cfg, params)
    status = trial_status(res, trial, tune_trial, saved)
    error = results.error_text(res.error)
    overrides = params.get("overrides") or {}
    tree = trial.to_dict() | ({"params": overrides} if overrides else {})  # grid/search values
    if cfg.preregistration:  # in every row, so the report is a function of the results alone
        tree["preregistration"] = asdict(cfg.preregistration.resolved(cfg.labels(), cfg.seed_offsets()))
    fields = results.trial_fields(tree, trial_name(trial), trial.hash(), status, error, sha, vers)
    rows = results.long_rows(history(res), fields)
    if status == "failed":
        rows.append({**fields, "step": -1, "split": "status", "metric": "failed", "value": 1.0,
                     "stderr": float("nan"), "higher_is_better": False})
    metrics = res.metrics or {}
    line = {"trial": trial_name(trial), "variant": trial.variant, "seed": trial.seed,
            "status": status, "attempts": attempts(tune_trial, status),
            "wall_s": metrics.get("time_total_s", math.nan),
            "head_acc": metrics.get("head_acc", math.nan) if status == "ok" else math.nan,
            "params": ", ".join(f"{k}={v}" for k, v in overrides.items())}
    return rows, line


TRIAL_COLUMNS = ["trial", "variant", "seed", "status", "attempts", "wall_s", "head_acc", "params"]


def collect(grid, cfg: SweepConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long rows from every trial of a ResultGrid (a failed trial keeps its rows and its error),
    and one line per trial (the end-of-sweep summary, ``trials.csv``)."""
    sha, vers = results.git_sha(), results.versions()
    rows, lines, saved = [], [], saved_statuses(experiment_dir(cfg))
    for res, tune_trial in zip(grid, tune_trials(grid)):
        trial_long, line = trial_rows(res, cfg, tune_trial, saved, sha, vers)
        rows.extend(trial_long)
        lines.append(line)
    return results.frame(rows), pd.DataFrame(lines, columns=TRIAL_COLUMNS)


def trials_path(cfg: SweepConfig) -> Path:
    return Path(cfg.output_dir) / "trials.csv"


def read_trials(output_dir: str | Path) -> pd.DataFrame | None:
    """The per-trial summary of the sweep's last run (in its resolved output_dir), or None."""
    csv = Path(output_dir) / "trials.csv"
    return pd.read_csv(csv, keep_default_na=False, na_values=[""]) if csv.exists() else None


def format_trials(table: pd.DataFrame) -> str:
    """One line per trial: trial, variant, seed, status, attempts, wall s, final head_acc."""
    if table is None or table.empty:
        return "(no trials)"
    if not table["params"].fillna("").astype(str).str.len().any():
        table = table.drop(columns="params")
    with pd.option_context("display.width", 200, "display.max_colwidth", 80,
                           "display.float_format", "{:.4g}".format):
        return table.to_string(index=False)


# ---------------------------------------------------------------- entry points
def check_fresh(cfg: SweepConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to run over an earlier sweep (or its Ray Train runs) unless asked to."""
    exp = experiment_dir(cfg)
    earlier = exp.exists() or any(exp.parent.glob("train-*"))
    if earlier and not (resume or overwrite):
        raise ConfigError(f"{cfg.source_file}: output_dir: {exp} already holds a sweep; pass "
                          "--resume to finish it or --overwrite to start again")
    if overwrite and exp.parent.exists():
        shutil.rmtree(exp.parent)


def check_same_sweep(cfg: SweepConfig, raw: dict[str, Any], resume: bool) -> None:
    """A resumed sweep must run the trials it started with: the same file (Tune restores its own
    copy of the trial list, while the trials would read the edited file) and the same resolved
    arms (the same file on other code can resolve to other trials: a changed default changes an
    arm's config hash, and a resumed sweep would mix trials of two methods). ``raw``: the file's
    mapping as :func:`harness.config.load` parsed it."""
    out = experiment_dir(cfg).parent
    snap, arms = out / "sweep.json", out / "arms.json"
    text = json.dumps(raw, sort_keys=True, default=str)
    hashes = {label: cfg.arm(label, cfg.seeds[0]).hash() for label in cfg.labels()}
    if resume and snap.exists() and snap.read_text() != text:
        raise ConfigError(f"{cfg.source_file}: the file changed since this sweep started (see {snap}); "
                          "resume with the original file, or pass --overwrite to start again")
    if resume and arms.exists():
        before = json.loads(arms.read_text())
        changed = sorted(a for a in hashes if before.get(a) not in (None, hashes[a]))
        if changed:
            raise ConfigError(
                f"{cfg.source_file}: the resolved config of arm(s) {changed} changed since this sweep "
                f"started (config hash {before[changed[0]]} -> {hashes[changed[0]]}, see {arms}): the "
                "code's defaults differ, so resumed trials would run another method than the "
                "finished ones; resume on the commit the sweep started on, or pass --overwrite")
    elif resume and snap.exists():
        log.warning("%s has no arms.json (started before resolved configs were recorded): a change "
                    "of the code's defaults since then cannot be detected", out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(snap, text)
    atomic.write_text(arms, json.dumps(hashes, sort_keys=True, indent=1))


def run_sweep(sweep: Loaded, resume: bool = False, overwrite: bool = False,
              address: str | None = None, verbose: bool = False,
              storage: str | None = None) -> pd.DataFrame:
    """Every trial of ``sweep`` (``harness.config.load(path)``: the file is not read again)."""
    cfg = resolve_output(sweep.config, storage, address)
    log.warning("sweep %s: results in %s", cfg.name, cfg.output_dir)  # the log's first line
    check_fresh(cfg, resume, overwrite)
    check_same_sweep(cfg, sweep.raw, resume)
    init_ray(address, verbose)
    start = time.perf_counter()
    grid = make_tuner(cfg, resume).fit()
    df, trials = collect(grid, cfg)
    out = results.write_parquet_atomic(df, Path(cfg.output_dir) / "results.parquet")
    trials.to_csv(trials_path(cfg), index=False)
    log.warning("sweep %s: %d trials, %d rows -> %s (%.0f s)", cfg.name, len(grid), len(df), out,
                time.perf_counter() - start)
    return df


def run_single(sweep: SweepConfig, strategy: str, seed: int | None = None,
               address: str | None = None, verbose: bool = False,
               storage: str | None = None) -> pd.DataFrame:
    """One trial through Ray Train, without Tune (``genrep-bench train``), for debugging.
    ``strategy`` may be any strategy or one of the sweep's named variants."""
    from harness.trial import fit

    from harness.modes import known_strategies

    cfg = resolve_output(sweep, storage, address)
    if strategy not in (*cfg.labels(), *known_strategies()):
        raise ConfigError(f"{cfg.source_file}: --strategy: unknown {strategy!r}; known: "
                          f"{sorted(known_strategies())} and the sweep's variants {list(cfg.variants)}")
    trial = cfg.arm(strategy, cfg.seeds[0] if seed is None else seed)
    init_ray(address, verbose)
    storage = str(Path(cfg.output_dir).resolve() / "ray")
    dataset = resolve_dataset(cfg)
    init = warmstart.resolve_init(cfg, dataset, storage)
    res = fit(trial, dataset.plain(), storage, f"single-{trial_name(trial)}", in_tune=False,
              init_dir=init["dir"] if init else None)
    fields = results.trial_fields(trial.to_dict(), trial_name(trial), trial.hash(),
                                  "failed" if res.error else "ok", results.error_text(res.error),
                                  results.git_sha(), results.versions())
    rows = history(res)
    final = getattr(res, "return_value", None)
    if isinstance(final, dict) and not any(r.get("split") == final.get("split") for r in rows):
        rows.append(final)
    return results.frame(results.long_rows(rows, fields))
