"""The one metric registry: each metric's name, direction (↑/↓), unit and kind.

Results (``higher_is_better`` column), reports (↑/↓ labels, best-in-column), the Optuna search
(objectives and their default direction) and ``perf`` all read this table; a metric is added here
once. ``kind`` groups metrics in reports: perception, generation, teacher, cost, conflict, loss.
"""
from __future__ import annotations

from typing import NamedTuple


class Metric(NamedTuple):
    name: str
    higher_is_better: bool | None  # None: no direction (telemetry such as cos)
    unit: str = ""
    kind: str = ""
    objective: bool = False  # may be an Optuna objective (read off a trial's final report)


def _m(name, hib, unit="", kind="", objective=False) -> tuple[str, Metric]:
    return name, Metric(name, hib, unit, kind, objective)


METRICS: dict[str, Metric] = dict([
    # perception
    _m("acc", True, "fraction", "perception"),
    _m("head_acc", True, "fraction", "perception", objective=True),
    _m("mc_acc", True, "fraction", "perception", objective=True),
    _m("head_ece", False, "fraction", "perception", objective=True),
    _m("kd_agree", True, "fraction", "perception"),
    _m("ref_val_acc", True, "fraction", "generation"),
    # generation
    _m("sample_acc", True, "fraction", "generation", objective=True),
    _m("fd_ref", False, "feature units²", "generation", objective=True),
    _m("heldout_loss", False, "mse", "generation", objective=True),
    # losses
    _m("loss_perc", False, "nats", "loss"),
    _m("loss_gen", False, "mse", "loss"),
    _m("loss_ce", False, "nats", "loss"),
    _m("loss_kd", False, "nats", "loss"),
    # cost
    _m("step_time", False, "s", "cost", objective=True),
    _m("images_per_s", True, "images/s", "cost"),
    _m("rss_mb", False, "MiB", "cost"),
    _m("mc_evals", False, "forwards/step", "cost"),
    _m("mc_stderr", False, "", "teacher"),
    _m("eval_seconds", False, "s", "cost"),
    _m("eval_network_evals", False, "forwards", "cost"),
    _m("mc_evals_per_image", False, "forwards/image", "cost"),
    _m("skipped_samples", False, "samples", "data"),
])


def direction(name: str) -> bool | None:
    """True if higher is better, False if lower is, None for an unregistered or neutral metric."""
    m = METRICS.get(name)
    return None if m is None else m.higher_is_better


def objectives() -> dict[str, str]:
    """Metrics Optuna may optimise, with their default mode ("max"/"min")."""
    return {n: "max" if m.higher_is_better else "min" for n, m in METRICS.items() if m.objective}
