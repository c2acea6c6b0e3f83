"""PCGrad for two tasks — Yu et al. 2020, "Gradient Surgery for Multi-Task Learning" (NeurIPS),
https://arxiv.org/abs/2001.06782.

When d = g_p·g_g < 0 each gradient is projected onto the normal plane of the other,
    g_p' = g_p − (d/‖g_g‖²)·g_g,   g_g' = g_g − (d/‖g_p‖²)·g_p,
and g = g_p' + g_g' = (1 − d/‖g_p‖²)·g_p + (1 − d/‖g_g‖²)·g_g, so
    w_p = 1 − d/‖g_p‖²,   w_g = 1 − d/‖g_g‖²   (w = [1, 1] when d ≥ 0).
With two tasks the random task order of the paper does not matter: both projections use the
original gradients. This is GenRep's damp-on-conflict rule at damping λ = 0.
Task weights (w_p, w_g) (option `task_weights`, default (1, 1)) apply after projecting:
g = w_p·g_p' + w_g·g_g' = (w_p − w_g·d/‖g_p‖²)·g_p + (w_g − w_p·d/‖g_g‖²)·g_g on conflict.
"""
from __future__ import annotations

from .registry import STRATEGIES, GramStats, Strategy, aligned_matrix, on_conflict


class PCGrad(Strategy):
    """Projecting conflicting gradients: λ = 0 on both sides where cos < 0, else both kept."""

    name = "pcgrad"

    def _aligned(self, s: GramStats, state, **opts):
        lam = on_conflict(s, 0.0)
        return aligned_matrix(s, lam, lam), lam, {}


STRATEGIES.register(PCGrad.name)(PCGrad())
