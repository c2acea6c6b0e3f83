"""Training modes by name: the one place that knows ``separate`` is a mode, not a combination rule.

- ``joint``: one GenRep network; a registered strategy (genrep.strategies) combines the task
  gradients of its shared parameters;
- ``separate``: two networks of the same architecture, one per task (the "no sharing" reference).
The step classes register under these names in ``harness.step``; config validation, the sweep
and the reports ask this module, never compare a strategy name with "separate".
"""
from __future__ import annotations

from genrep import strategies

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
