"""The pre-registration's rules against the sweep it belongs to (``preregistration:``).

Called by :func:`harness.config.checks.cross_checks` once every field has its type and range. The
section names arms, metrics, controls and the pilot's numbers; each is checked here against the
arms the sweep runs and the metrics they produce, and the pilot's paired SD against the margins
and MDEs it is meant to reach (``harness.power``: a margin that TOST can never accept with the
registered seeds is refused, as is an MDE that needs more seeds than are registered). harness.metrics
and harness.power are imported inside the checks: a trial rebuilding its config pays neither.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

from harness.config.convert import ConfigError
from harness.config.schema import TrialConfig
from harness.config.sweep_schema import PreregistrationConfig, SweepConfig

AT = "preregistration"
# a metric the held-out evaluation only produces with this perception task
PRIMARY_NEEDS_TASK = {"head_acc": "classify", "head_ece": "classify", "miou": "segment",
                      "pixel_acc": "segment"}


def check_preregistration(cfg: SweepConfig, where: str) -> None:
    """Arms, the family of triples, metrics and margins, controls, seeds, pilot, ablation rows."""
    p = cfg.preregistration
    if p is None:
        return
    if cfg.search or cfg.grid:
        raise ConfigError(f"{where}: {AT}: pairs fixed arms on seeds; a search or a grid crosses an "
                          "arm with several configurations (use variants)")
    if p.seed_offsets:
        raise ConfigError(f"{where}: {AT}.seed_offsets: filled from variants.<arm>.seed_offset when "
                          "results are written; set the offset on the variant")
    _check_arms(cfg, p, where)
    _check_controls(cfg, p, where)
    r = p.resolved(cfg.labels(), cfg.seed_offsets())
    _check_family(cfg, r, where)
    _check_metrics(cfg, r, where)
    if len(cfg.seeds) < p.seeds:
        raise ConfigError(f"{where}: seeds: {len(cfg.seeds)} listed, fewer than the {p.seeds} paired "
                          f"seeds registered in {AT}.seeds")
    _check_pilot(r, where)
    _check_ablation(p, cfg.labels(), where)


def _named_arms(p: PreregistrationConfig) -> Iterator[tuple[str, str | None]]:
    """(field path, arm) for every arm the section names."""
    yield "baseline", p.baseline
    yield from ((f"comparisons[{i}]", a) for i, a in enumerate(p.comparisons))
    for i, c in enumerate(p.family):
        yield f"family[{i}].arm", c.arm
        yield f"family[{i}].reference", c.reference
    yield "controls.aa", p.controls.aa
    yield "controls.positive.arm", p.controls.positive.arm if p.controls.positive else None


def _check_arms(cfg: SweepConfig, p: PreregistrationConfig, where: str) -> None:
    arms = cfg.labels()
    for path, name in _named_arms(p):
        if name is not None and name not in arms:
            raise ConfigError(f"{where}: {AT}.{path}: {name!r} is no arm of this sweep; arms: {list(arms)}")
    if p.baseline in p.comparisons or len(set(p.comparisons)) != len(p.comparisons):
        raise ConfigError(f"{where}: {AT}.comparisons: distinct arms other than the baseline {p.baseline!r}")
    for i, c in enumerate(p.family):
        if c.arm == c.reference:
            raise ConfigError(f"{where}: {AT}.family[{i}]: arm and reference are both {c.arm!r}")


def _check_family(cfg: SweepConfig, r: PreregistrationConfig, where: str) -> None:
    """Something is registered, each triple once, and a control only in ``controls``."""
    for control in r.control_arms():
        named = [path for path, a in _named_arms(r) if a == control and not path.startswith("controls")]
        if named:
            raise ConfigError(f"{where}: {AT}.{named[0]}: {control!r} is a control; a control is "
                              "registered once, in controls")
    triples = r.triples()
    if not triples:
        raise ConfigError(f"{where}: {AT}: registers no comparison: give primary metrics (with "
                          "comparisons, or every other arm by default) or family triples")
    seen = set()
    for c in triples:
        key = (c.arm, c.reference, c.metric)
        if key in seen:
            raise ConfigError(f"{where}: {AT}: {c.arm} − {c.reference} on {c.metric} is registered "
                              "twice (comparisons × primary, family and controls make one family)")
        seen.add(key)


def _metric_paths(r: PreregistrationConfig) -> dict[str, str]:
    """Each metric of the family -> the field that first names it (for errors)."""
    out: dict[str, str] = {}
    for i, m in enumerate(r.primary):
        out.setdefault(m, f"primary[{i}]")
    for i, c in enumerate(r.family):
        out.setdefault(c.metric, f"family[{i}].metric")
    if r.controls.positive:
        out.setdefault(r.controls.positive.metric, "controls.positive.metric")
    return out


def _check_metrics(cfg: SweepConfig, r: PreregistrationConfig, where: str) -> None:
    """Every metric of the family is held-out, produced by the arms compared on it, has a margin
    > 0 and at most one MDE > 0; margins and MDEs name no other metric."""
    from harness.metrics import held_out

    known = {*held_out(), "pixel_acc"}
    paths, triples = _metric_paths(r), r.triples()
    tasks = {a: cfg.arm(a, cfg.seeds[0]).method.perception.tasks for a in cfg.labels()}
    for m, path in paths.items():
        if m not in known:
            raise ConfigError(f"{where}: {AT}.{path}: {m!r} is not a held-out metric of the "
                              f"registry (harness.metrics); known: {sorted(known)}")
        need = PRIMARY_NEEDS_TASK.get(m)
        on_m = dict.fromkeys(a for c in triples if c.metric == m for a in (c.reference, c.arm))
        lacking = [a for a in on_m if need and need not in tasks[a]]
        if lacking:
            raise ConfigError(f"{where}: {AT}.{path}: {m} needs the {need} task "
                              f"(method.perception.tasks), which arm {lacking[0]!r} does not train")
    for m in paths:
        if not _positive(r.margins.get(m)):
            raise ConfigError(f"{where}: {AT}.margins.{m}: every metric of the family needs an "
                              f"equivalence margin > 0 in the metric's units, got {r.margins.get(m)!r}")
    for name, mapping in (("margins", r.margins), ("mde", r.mde)):
        for m, v in mapping.items():
            if m not in paths:
                raise ConfigError(f"{where}: {AT}.{name}.{m}: not a metric of the family ({list(paths)})")
            if not _positive(v):
                raise ConfigError(f"{where}: {AT}.{name}.{m}: must be a number > 0, got {v!r}")


def _positive(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0


def _check_controls(cfg: SweepConfig, p: PreregistrationConfig, where: str) -> None:
    """A/A: a variant with the baseline's config and a seed offset whose seeds miss the
    baseline's; positive control: another arm than the baseline, the A/A, with another config."""
    c, seed = p.controls, cfg.seeds[0]
    base = cfg.arm(p.baseline, seed)
    if c.aa is not None:
        at, v = f"{AT}.controls.aa", cfg.variants.get(c.aa)
        if c.aa == p.baseline or v is None or not v.seed_offset:
            raise ConfigError(f"{where}: {at}: {c.aa!r} must be a variant with a seed_offset > 0 "
                              f"(variants.<arm>.seed_offset: its seed i is the baseline's seed i "
                              "plus the offset), not the baseline or a strategy")
        differs = config_difference(cfg.arm(c.aa, seed), base)
        if differs:
            raise ConfigError(f"{where}: {at}: {c.aa!r} differs from the baseline {p.baseline!r} "
                              f"in {differs}: an A/A arm is the baseline's config under another label")
        shared = sorted({s + v.seed_offset for s in cfg.seeds} & set(cfg.seeds))
        if shared:
            raise ConfigError(f"{where}: variants.{c.aa}.seed_offset: {v.seed_offset} gives the A/A "
                              f"arm seeds the baseline also runs ({shared}): use an offset > "
                              f"{max(cfg.seeds) - min(cfg.seeds)}")
    if c.positive is not None:
        at, arm = f"{AT}.controls.positive.arm", c.positive.arm
        if arm in (p.baseline, c.aa):
            raise ConfigError(f"{where}: {at}: {arm!r} is the baseline or the A/A arm")
        if not config_difference(cfg.arm(arm, seed), base):
            raise ConfigError(f"{where}: {at}: {arm!r} has the baseline's config: nothing makes it "
                              f"{c.positive.expect} (e.g. data.label_noise: 0.4)")


def _flat(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def config_difference(a: TrialConfig, b: TrialConfig) -> str | None:
    """The first dotted field where two trials' configs differ, their seed and label aside."""
    fa, fb = dict(_flat(a.to_dict())), dict(_flat(b.to_dict()))
    for path in sorted(set(fa) | set(fb)):
        if path not in ("seed", "variant") and fa.get(path) != fb.get(path):
            return path
    return None


def _check_pilot(r: PreregistrationConfig, where: str) -> None:
    """The pilot's numbers, against the registration: each paired SD on a metric of the family;
    the seeds it chose registered; every margin reachable by TOST with those seeds
    (margin > t_{1−α,n−1}·s_d/√n) and every MDE reached at α/m with the registered power."""
    from harness.power import seeds_for_margin, seeds_for_mde, tost_floor

    pilot, at = r.pilot, f"{AT}.pilot"
    if pilot is None:
        return
    metrics = _metric_paths(r)
    for m, sd in pilot.paired_sd.items():
        if m not in metrics:
            raise ConfigError(f"{where}: {at}.paired_sd.{m}: not a metric of the family ({list(metrics)})")
        if isinstance(sd, bool) or not isinstance(sd, (int, float)) or math.isnan(sd) or sd < 0:
            raise ConfigError(f"{where}: {at}.paired_sd.{m}: must be a number >= 0, got {sd!r}")
    if pilot.seeds_chosen is not None and pilot.seeds_chosen != r.seeds:
        raise ConfigError(f"{where}: {at}.seeds_chosen: {pilot.seeds_chosen}, but {AT}.seeds "
                          f"registers {r.seeds}: register the seeds the pilot chose")
    n, level = r.seeds, round(100 * (1 - 2 * r.alpha))
    for m, sd in pilot.paired_sd.items():
        floor = tost_floor(sd, n, r.alpha)
        if sd > 0 and not r.margins[m] > floor:
            raise ConfigError(
                f"{where}: {AT}.margins.{m}: ±{r.margins[m]:g} can never be reached: with {n} seeds "
                f"and the pilot's paired SD {sd:g}, TOST's {level}% interval is ±{floor:.3g} wide "
                f"even at Δ = 0 (t_{{1−α,n−1}}·sd/√n); widen the margin beyond {floor:.3g} or "
                f"register {seeds_for_margin(sd, r.margins[m], r.alpha)} seeds or more")
        target = r.mde.get(m)
        if target and sd > 0:
            need = seeds_for_mde(sd, target, r.alpha_first(), r.power)
            if need > n:
                raise ConfigError(
                    f"{where}: {AT}.mde.{m}: detecting {target:g} with power {r.power:g} at "
                    f"α/m = {r.alpha_first():.3g} needs {need} paired seeds given the pilot's "
                    f"paired SD {sd:g}; {AT}.seeds registers {n}")


def _check_ablation(p: PreregistrationConfig, arms: tuple[str, ...], where: str) -> None:
    """The paper-shaped rows: existing arms, distinct row names, ``vs`` another row, and each
    paper direction (up|down) on a registered metric with a direction, for a known row."""
    from harness.metrics import direction

    at, rows = f"{AT}.ablation", [r.row for r in p.ablation]
    if len(set(rows)) != len(rows):
        raise ConfigError(f"{where}: {at}: row names must be distinct, got {rows}")
    for i, r in enumerate(p.ablation):
        if r.arm not in arms:
            raise ConfigError(f"{where}: {at}[{i}].arm: {r.arm!r} is no arm of this sweep; "
                              f"arms: {list(arms)}")
        if r.vs is not None and (r.vs not in rows or r.vs == r.row):
            raise ConfigError(f"{where}: {at}[{i}].vs: {r.vs!r} is not another row of the table")
    for row, dirs in p.paper_direction.items():
        here = f"{AT}.paper_direction.{row}"
        if row not in rows:
            raise ConfigError(f"{where}: {here}: no ablation row of that name; rows: {rows}")
        if not isinstance(dirs, dict):
            raise ConfigError(f"{where}: {here}: expected a mapping metric -> up|down, got {dirs!r}")
        for m, d in dirs.items():
            if direction(m) is None:
                raise ConfigError(f"{where}: {here}.{m}: not a registered metric with a direction")
            if d not in ("up", "down"):
                raise ConfigError(f"{where}: {here}.{m}: must be up or down, got {d!r}")
