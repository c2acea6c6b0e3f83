"""Loss summing: g = w_p·g_p + w_g·g_g, i.e. w = task_weights (the multi-task baseline; no alignment).

With the default task weights (1, 1) this is naive summing; with (0.7, 0.3) it is the published
arm's weighting without its alignment, the baseline that isolates what the alignment adds.
"""
from __future__ import annotations

import torch

from .registry import STRATEGIES, GramStats, Strategy, identity_matrix


class Sum(Strategy):
    """M = I (both gradients kept whole), so w = (w_p, w_g) on every segment; damping λ = 1."""

    name = "sum"
    # M ≡ I: one backward of w_p·L_p + w_g·L_g gives the same gradient (see `loss_weights`)
    needs_task_grads = False

    def _aligned(self, s: GramStats, state, **opts):
        return identity_matrix(s), torch.ones_like(s.cos), {}


STRATEGIES.register(Sum.name)(Sum())
