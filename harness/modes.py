"""Training modes by name: the one place that knows ``separate`` is a mode, not a combination rule.

- ``joint``: one GenRep network; a registered strategy (genrep.strategies) combines the task
  gradients of its shared parameters;
- ``separate``: two networks of the same architecture, one per task (the "no sharing" reference).
The step classes register under these names in ``harness.step``; config validation, the sweep
and the reports ask this module, never compare a strategy name with "separate".
"""
from __future__ import annotations

from genrep import strategies
from genrep.strategies.registry import task_weights_option

# arms that are a training mode of their own rather than a combination rule in the joint mode
STANDALONE = ("separate",)


def mode_of(strategy: str) -> str:
    """The training mode that runs an arm of this strategy name."""
    return strategy if strategy in STANDALONE else "joint"


def known_strategies() -> list[str]:
    """Every name a sweep may list under ``strategies``: the rules, then the standalone modes."""
    return [*strategies.available(), *STANDALONE]


def is_joint(strategy: str) -> bool:
    return mode_of(strategy) == "joint"


def check_options(strategy: str, options: dict) -> dict:
    """The arm's options, defaults filled in and checked (TypeError/ValueError naming the option).

    A rule checks its own; ``separate`` takes only ``task_weights`` (nothing is shared, so the
    weights only scale each network's loss, which Adam's normalisation mostly undoes: accepted
    for a like-for-like arm, docs/method.md).
    """
    if is_joint(strategy):
        return strategies.get(strategy).check_options(options)
    unknown = sorted(set(options) - {"task_weights"})
    if unknown:
        raise TypeError(f"strategy {strategy!r}: unknown option(s) {unknown}; known: task_weights")
    return {"task_weights": task_weights_option(options.get("task_weights", (1.0, 1.0)), strategy)}
