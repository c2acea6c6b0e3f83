"""``genrep-bench pilot``: a few seeds of two arms, run as a real sweep, to size the registered run.

A pre-registered comparison needs to know, before it runs, how many paired seeds reach the effect
it means to detect; that depends on the paired spread s_d, which only a run can measure. The pilot
runs the sweep's baseline and the arm of its first registered comparison (the reference and the
arm of ``preregistration.triples()[0]``) for ``preregistration.pilot.seeds`` seeds, as a sweep of
its own (:func:`pilot_sweep`: the sweep file's own mapping with two arms, the pilot's seeds, no
pre-registration, results under ``<output_dir>/pilot/`` and the main run's data cache), then,
per primary metric (:func:`size_table`):

- the paired SD s_d of arm − reference over the pilot's seeds;
- the seeds a paired t test needs to detect the registered MDE (``preregistration.mde``, else the
  metric's margin) with the registered power at α/m, the level Holm tests the family's first
  comparison at (m triples: the whole registered family), ``harness.power.seeds_for_mde``;
- the MDE the registered seed count reaches at α/m, and TOST's floor t_{1−α,n−1}·s_d/√n at the
  suggested seed count: a margin at or below it can never be accepted;
- the wall time per trial (trials.csv's ``wall_s``) and the whole sweep's estimate at those seeds.

It prints the table and the ``pilot:`` block to commit into the sweep file (docs/sweeps.md), and
writes both to ``<output_dir>/pilot/pilot.csv`` and ``pilot.json``. Loading the file then checks
the committed numbers against the margins, MDEs and seeds (``harness.config.registration``).
"""
from __future__ import annotations

import copy
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd

from harness import atomic, results
from harness.config import ConfigError, Loaded, PreregistrationConfig, SweepConfig, from_dict
from harness.data.resolve import data_root
from harness.power import mde_paired, seeds_for_mde, tost_floor
from harness.report.prereg import paired
from harness.report.stats import paired_t_test
from harness.report.tables import final_values, held_out_split
from harness.sweep import read_trials, resolve_output, run_sweep

PILOT_COLUMNS = ["metric", "arm", "reference", "n", "delta", "paired_sd", "target", "target_from",
                 "alpha_holm", "m", "seeds_needed", "mde_at_registered", "n_registered", "margin",
                 "margin_floor", "wall_s_per_trial"]


def registered(cfg: SweepConfig) -> PreregistrationConfig:
    """The sweep's pre-registration as the results will store it; a pilot needs one."""
    if cfg.preregistration is None:
        raise ConfigError(f"{cfg.source_file}: preregistration: the pilot sizes a pre-registered "
                          "comparison; this sweep registers none")
    return cfg.preregistration.resolved(cfg.labels(), cfg.seed_offsets())


def pilot_arms(p: PreregistrationConfig) -> tuple[str, str]:
    """(reference, arm) of the family's first comparison: the baseline and its first arm."""
    first = p.triples()[0]
    return first.reference, first.arm


def pilot_seeds(cfg: SweepConfig, n: int) -> list[int]:
    """The sweep's first n seeds, continued past its largest one when it lists fewer."""
    seeds = list(cfg.seeds[:n])
    while len(seeds) < n:
        seeds.append(max(seeds) + 1)
    return seeds


def pilot_sweep(sweep: Loaded, n_seeds: int | None = None, storage: str | None = None,
                address: str | None = None) -> Loaded:
    """The pilot as a sweep of its own, validated like any: the file's mapping with the two pilot
    arms only (a variant stays a variant, ``strategies`` keeps only a strategy among them), the
    pilot's seeds, no pre-registration, ``<output_dir>/pilot`` and the main run's data root (its
    packed shards and warm start are reused)."""
    cfg = resolve_output(sweep.config, storage, address)
    p = registered(cfg)
    arms = pilot_arms(p)
    raw = copy.deepcopy(sweep.raw)
    raw.pop("preregistration", None)
    variants = raw.get("variants") or {}
    raw.update(name=f"{cfg.name}_pilot", output_dir=str(Path(cfg.output_dir) / "pilot"),
               seeds=pilot_seeds(cfg, n_seeds or (p.pilot.seeds if p.pilot else 3)),
               strategies=[a for a in arms if a not in variants],
               variants={a: variants[a] for a in arms if a in variants},
               data={**(raw.get("data") or {}), "root": str(data_root(cfg))})
    return Loaded(from_dict(raw, f"{cfg.source_file} (pilot)"), raw)


def size_table(df: pd.DataFrame, p: PreregistrationConfig, arm: str, reference: str,
               wall_s: float, offsets: dict[str, int] | None = None) -> pd.DataFrame:
    """Per primary metric: the pilot's paired Δ and s_d (arm − reference, last held-out
    evaluation; s_d to 4 significant figures, as the block records it), the seeds needed for the registered MDE (else the margin) at α/m with power
    ``p.power`` (``seeds_for_mde``), the MDE at the registered seeds (``mde_paired``) and TOST's
    floor at the seeds needed (``tost_floor``)."""
    df = df if "sweep" in df else df.assign(sweep="")  # final_values pairs on (sweep, seed)
    split, rows, alpha_m = held_out_split(df), [], p.alpha_first()
    for m in p.metrics():
        both = paired(final_values(df, m, split), arm, reference, offsets)
        t = paired_t_test((both["arm"] - both["base"]).tolist())
        target, source = (p.mde[m], "mde") if m in p.mde else (p.margins[m], "margin")
        sd = float(f"{t['sd']:.4g}")  # as the block records it, so loading it gives the same n
        need = seeds_for_mde(sd, target, alpha_m, p.power) if not math.isnan(sd) else math.nan
        rows.append({"metric": m, "arm": arm, "reference": reference, "n": t["n"], "delta": t["mean"],
                     "paired_sd": sd, "target": target, "target_from": source,
                     "alpha_holm": alpha_m, "m": len(p.triples()), "seeds_needed": need,
                     "mde_at_registered": mde_paired(sd, p.seeds, alpha_m, p.power),
                     "n_registered": p.seeds, "margin": p.margins[m],
                     "margin_floor": tost_floor(sd, need, p.alpha) if not math.isnan(sd) else math.nan,
                     "wall_s_per_trial": wall_s})
    return pd.DataFrame(rows, columns=PILOT_COLUMNS)


def wall_per_trial(trials: pd.DataFrame | None) -> float:
    """Mean wall seconds of the finished trials (trials.csv's ``wall_s``); NaN without one."""
    if trials is None or trials.empty:
        return math.nan
    done = trials.loc[trials["status"] == "ok", "wall_s"].dropna()
    return float(done.mean()) if len(done) else math.nan


def block(table: pd.DataFrame, n_seeds: int) -> dict[str, Any]:
    """The ``preregistration.pilot`` block to commit: what the pilot measured and the seeds it
    chose (the largest seeds_needed over the metrics)."""
    needed = [int(v) for v in table["seeds_needed"] if not math.isnan(v)]
    wall = float(table["wall_s_per_trial"].iloc[0]) if len(table) else math.nan
    out: dict[str, Any] = {"seeds": n_seeds,
                           "paired_sd": {r.metric: float(r.paired_sd) for r in table.itertuples()
                                         if not math.isnan(r.paired_sd)}}
    if not math.isnan(wall):
        out["wall_s_per_trial"] = round(wall, 1)
    if needed:
        out["seeds_chosen"] = max(needed)
    out["measured_on"] = (f"{time.strftime('%Y-%m-%d')}, {platform.node() or 'unknown host'} "
                          f"({platform.processor() or platform.machine()}), git {results.git_sha()}")
    return out


def run_pilot(sweep: Loaded, n_seeds: int | None = None, resume: bool = False,
              overwrite: bool = False, address: str | None = None, verbose: bool = False,
              storage: str | None = None) -> dict[str, Any]:
    """Run the pilot sweep, size the registered run, write ``pilot.csv`` and ``pilot.json`` into
    the pilot's output dir. Returns the table, the block, the trials and the file paths."""
    pilot = pilot_sweep(sweep, n_seeds, storage, address)
    main = resolve_output(sweep.config, storage, address)
    p, cfg = registered(main), resolve_output(pilot.config, storage, address)
    reference, arm = pilot_arms(p)
    df = run_sweep(pilot, resume=resume, overwrite=overwrite, address=address, verbose=verbose,
                   storage=storage)
    trials = read_trials(cfg.output_dir)
    table = size_table(df, p, arm, reference, wall_per_trial(trials), cfg.seed_offsets())
    chosen = block(table, len(cfg.seeds))
    n_trials = len(main.labels()) * chosen.get("seeds_chosen", p.seeds)
    est = math.ceil(n_trials / main.resources.max_concurrent) * table["wall_s_per_trial"].iloc[0]
    out = Path(cfg.output_dir)
    meta = {"sweep": main.name, "source_file": main.source_file, "arms": [reference, arm],
            "seeds": list(cfg.seeds), "alpha": p.alpha, "power": p.power, "m": len(p.triples()),
            "alpha_holm": p.alpha_first(), "block": chosen, "sweep_trials": n_trials,
            "sweep_wall_s_est": None if math.isnan(est) else round(float(est)),
            "table": json.loads(table.to_json(orient="records"))}
    paths = {"pilot.csv": atomic.write_text(out / "pilot.csv", table.to_csv(index=False)),
             "pilot.json": atomic.write_text(out / "pilot.json", json.dumps(meta, indent=1))}
    return {"table": table, "block": chosen, "meta": meta, "trials": trials, "results": df,
            "paths": paths}
