"""``genrep-bench``: sweep, pilot, train, validate, data pack, report, perf."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _quiet(verbose: bool) -> None:
    """Ray's and DeepSpeed's chatter at warning level unless --verbose."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("harness").setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        os.environ["GENREP_VERBOSE"] = "1"
    else:
        for name in ("ray", "DeepSpeed", "deepspeed", "torch.distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def cmd_sweep(args) -> int:
    """Exit 0 when every trial finished; 1 when any failed or is unfinished (listed on stderr)."""
    from harness.config import load
    from harness.report.tables import summary
    from harness.sweep import format_trials, read_trials, resolve_output, run_sweep

    sweep = load(args.sweep_file)  # the file's only read: run_sweep gets the parsed sweep
    # resolved (or refused) before Ray starts; run_sweep resolves it the same way
    out = resolve_output(sweep.config, args.storage, args.address).output_dir
    df = run_sweep(sweep, resume=args.resume, overwrite=args.overwrite,
                   address=args.address, verbose=args.verbose, storage=args.storage)
    trials = read_trials(out)
    print_controls(df.assign(sweep=sweep.config.name))  # a failed control first
    print(format_trials(trials))
    print_summary(summary(df))
    failed = df.loc[df["status"] == "failed", "trial"].unique()
    for name in failed:
        print(f"FAILED trial {name}: {df.loc[df['trial'] == name, 'error'].iloc[0]}", file=sys.stderr)
    unfinished = [] if trials is None else list(trials.loc[trials["status"] == "unfinished", "trial"])
    for name in unfinished:
        print(f"UNFINISHED trial {name}: run again with --resume", file=sys.stderr)
    sys.stderr.flush()
    print(f"results in {os.path.abspath(out)}", flush=True)  # the log's last line
    return 1 if len(failed) or unfinished else 0


def cmd_pilot(args) -> int:
    """Run the pilot (harness.pilot); print its table and the ``pilot:`` block to commit.
    Exit 0 when every pilot trial finished, else 1."""
    from pathlib import Path

    import yaml

    from harness.config import load
    from harness.pilot import run_pilot

    out = run_pilot(load(args.sweep_file), n_seeds=args.seeds, resume=args.resume,
                    overwrite=args.overwrite, address=args.address, verbose=args.verbose,
                    storage=args.storage)
    meta = out["meta"]
    print(f"pilot of {meta['sweep']}: {' vs '.join(reversed(meta['arms']))}, seeds {meta['seeds']}; "
          f"family of m = {meta['m']} comparisons, α/m = {meta['alpha_holm']:.3g}, power {meta['power']:g}")
    print_summary(out["table"].set_index("metric"))
    est = meta["sweep_wall_s_est"]
    print(f"the registered sweep at seeds_chosen: {meta['sweep_trials']} trials, about "
          f"{'?' if est is None else f'{est / 60:.0f} min'} of wall time")
    print("commit into the sweep file's preregistration (and set seeds: to seeds_chosen):")
    print(yaml.safe_dump({"pilot": out["block"]}, sort_keys=False, allow_unicode=True), end="")
    for name, path in out["paths"].items():
        print(f"{name}: {Path(path).resolve()}")
    trials = out["trials"]
    return 0 if trials is not None and (trials["status"] == "ok").all() else 1


def cmd_train(args) -> int:
    from harness.config import load
    from harness.report.tables import summary
    from harness.sweep import run_single

    df = run_single(load(args.sweep_file).config, args.strategy, args.seed, address=args.address,
                    verbose=args.verbose, storage=args.storage)
    print_summary(summary(df))
    return 0 if (df["status"] == "ok").all() else 1


def cmd_validate(args) -> int:
    from harness.config import load

    cfg = load(args.sweep_file).config
    if cfg.search:
        print(f"{args.sweep_file}: ok (search over {sorted(cfg.search.space)}, "
              f"strategy {cfg.strategies[0]!r}, seeds {list(cfg.seeds)})")
    else:
        print(f"{args.sweep_file}: ok ({len(cfg.trials())} trials: arms {list(cfg.labels())} "
              f"x seeds {list(cfg.seeds)} x {len(cfg.grid_points())} grid points)")
    if cfg.preregistration:
        p = cfg.preregistration.resolved(cfg.labels(), cfg.seed_offsets())
        print(f"  pre-registered family: {len(p.triples())} comparisons, α/m = {p.alpha_first():.3g}"
              f"{', controls ' + ', '.join(p.control_arms()) if p.control_arms() else ''}")
    return 0


def cmd_pack(args) -> int:
    from harness.data import pack

    split = tuple(float(v) for v in args.split.split("/"))
    path = pack(args.source, args.out, shard_size=args.shard_size, image_size=args.image_size,
                split=split, seed=args.seed, **({"count": args.count} if args.count else {}))
    print(path)
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from harness.report import build_report, format_table, load, main_table
    from harness.sweep import under_storage

    found = [str(under_storage(p, args.storage)) for p in args.results]  # as the sweep put them
    first = Path(found[0])
    out = args.out or (first if first.is_dir() else first.parent) / "report"
    paths = build_report(found, out, baseline=args.baseline)
    df = load(found)
    print_controls(df)
    print(paths["report.md"])
    print_summary(format_table(main_table(df, baseline=args.baseline), markup="plain"))
    print(f"HTML report: {Path(paths['report.html']).resolve()}")
    return 0


def cmd_perf(args) -> int:
    """Measure the harness's cost against its targets (harness.perf, docs/performance.md)."""
    from pathlib import Path

    from harness.config import load
    from harness.perf import IDS, Settings, keep_others, markdown, run_perf, write_all

    ids = [i.strip() for i in (args.only or ",".join(IDS)).split(",") if i.strip()]
    skip = {i.strip() for i in (args.skip or "").split(",") if i.strip()}
    unknown = sorted((set(ids) | skip) - set(IDS))
    if unknown:
        print(f"error: unknown perf id(s) {unknown}; known: {list(IDS)}", file=sys.stderr)
        return 2
    quick = dict(repeats=3, warmup=1, p3b_steps=100, p3b_images=64, p3b_seeds=1, p5_steps=20) if args.quick else {}
    given = {k: v for k, v in (("repeats", args.repeats), ("p3b_steps", args.p3b_steps),
                                ("p5_steps", args.p5_steps)) if v is not None}
    settings = Settings(sweep=load(args.sweep).config, ids=tuple(i for i in ids if i not in skip),
                        quick=args.quick, threads=args.threads, out=args.out, **{**quick, **given})
    rows, meta = run_perf(settings)
    if args.update:
        rows = keep_others(Path(args.out), rows, meta)
    paths = write_all(Path(args.out), rows, meta)
    print(markdown(rows, meta))
    print(paths["perf.md"])
    return 1 if any(r.what == "(failed)" for r in rows) else 0


def print_controls(df) -> None:
    """A failed registered control, first: the run cannot be trusted (harness.report.prereg)."""
    from harness.report.prereg import control_lines

    for line in control_lines(df):
        print(line, flush=True)


def print_summary(table) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string() if len(table) else "(no results)")


class _StrategyHelp(argparse.HelpFormatter):
    """Fills ``{strategies}`` in a help text from harness.modes only when help is printed: listing
    them imports torch (1.5 s), which the other commands' start-up should not pay."""

    def _get_help_string(self, action):
        from harness.modes import known_strategies

        return action.help.replace("{strategies}", " | ".join(known_strategies()))


STORAGE_HELP = ("absolute root for a relative output_dir (default: GENREP_STORAGE); required for a "
                "relative output_dir inside a Ray job or on a joined cluster")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genrep-bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_sweep(name: str, help: str, **kw) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help, **kw)
        s.add_argument("sweep_file", help="a sweep YAML file (see sweeps/)")
        s.add_argument("--verbose", action="store_true", help="Ray's and DeepSpeed's logs at INFO")
        s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or embedded)")
        s.add_argument("--storage", help=STORAGE_HELP)
        return s

    s = with_sweep("sweep", "run every trial of a sweep with Ray Tune and print the results")
    s.add_argument("--resume", action="store_true",
                   help="finish an interrupted sweep: finished trials are kept, the rest run")
    s.add_argument("--overwrite", action="store_true", help="delete an earlier run of this sweep")
    s.set_defaults(fn=cmd_sweep)
    s = with_sweep("pilot", "run a few seeds of the baseline and the first registered comparison; "
                   "print the paired SD, the seeds needed and the wall time per trial")
    s.add_argument("--seeds", type=int, help="pilot seeds (default: preregistration.pilot.seeds, or 3)")
    s.add_argument("--resume", action="store_true", help="finish an interrupted pilot")
    s.add_argument("--overwrite", action="store_true", help="delete an earlier pilot of this sweep")
    s.set_defaults(fn=cmd_pilot)
    s = with_sweep("train", "run one trial through Ray Train without Tune (debugging)",
                   formatter_class=_StrategyHelp)
    s.add_argument("--strategy", required=True, help="{strategies}, or a variant of the sweep")
    s.add_argument("--seed", type=int, help="default: the sweep's first seed")
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("validate", help="check a sweep file without running it")
    s.add_argument("sweep_file")
    s.set_defaults(fn=cmd_validate, verbose=False)
    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("pack", help="pack a source into webdataset shards with a manifest")
    s.add_argument("--source", required=True, help="digits | shapes | folder:PATH | npz:PATH")
    s.add_argument("--out", required=True)
    s.add_argument("--shard-size", type=int, default=500)
    s.add_argument("--image-size", type=int, default=16)
    s.add_argument("--split", default="0.8/0.1/0.1", help="train/val/test fractions")
    s.add_argument("--count", type=int, help="number of images (shapes)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_pack, verbose=False)
    s = sub.add_parser("report", help="tables, plots, report.md and report.html from results")
    s.add_argument("results", nargs="+", help="results/<sweep> directories or results.parquet files")
    s.add_argument("--out", help="output directory (default: <first results dir>/report)")
    s.add_argument("--baseline", default="sum", help="strategy the paired Δ is taken against")
    s.add_argument("--storage", help="the sweep's storage root: relative results paths are "
                   "looked up under it (default: GENREP_STORAGE)")
    s.set_defaults(fn=cmd_report, verbose=False)
    s = sub.add_parser("perf", help="measure the harness's cost against its targets (P1-P8)")
    s.add_argument("--quick", action="store_true",
                   help="few rounds, short P3b training and P5 trials; P7 not run (--update keeps "
                        "the last figure)")
    s.add_argument("--repeats", type=int, help="timed rounds per configuration (default 7, quick 3)")
    s.add_argument("--out", default="results/perf", help="where perf.csv/.md/.json go")
    s.add_argument("--sweep", default="sweeps/smoke.yaml", help="the sweep whose trial is measured")
    s.add_argument("--only", help="comma-separated ids, e.g. P1,P2 (default: all)")
    s.add_argument("--skip", help="comma-separated ids to leave out, e.g. P5,P7")
    s.add_argument("--update", action="store_true",
                   help="keep the rows of <out>/perf.json this run does not measure (with --only)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (the worker uses 1)")
    s.add_argument("--p3b-steps", type=int, help="training steps of the P3b model (0 = untrained)")
    s.add_argument("--p5-steps", type=int,
                   help="training steps of each P5 trial (default: the smoke sweep's 120)")
    s.set_defaults(fn=cmd_perf, verbose=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _quiet(args.verbose)
    from harness.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
