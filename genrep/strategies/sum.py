"""Loss summing: g = g_p + g_g, i.e. w = [1, 1] (the multi-task baseline; no alignment)."""
from __future__ import annotations

import torch

from .registry import STRATEGIES, GramStats, Strategy, telemetry


class Sum(Strategy):
    """w_p = w_g = 1 on every segment; damping λ = 1 (nothing removed)."""

    name = "sum"
    needs_task_grads = False  # w ≡ [1, 1]: one backward of L_p + L_g gives the same gradient

    def _weights(self, s: GramStats, state, **opts):
        w = torch.ones(*s.cos.shape, 2, dtype=s.cos.dtype, device=s.cos.device)
        return w, telemetry(s, w, torch.ones_like(s.cos))


STRATEGIES.register(Sum.name)(Sum())
