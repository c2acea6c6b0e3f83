"""PCGrad for two tasks — Yu et al. 2020, "Gradient Surgery for Multi-Task Learning" (NeurIPS),
https://arxiv.org/abs/2001.06782.

When d = g_p·g_g < 0 each gradient is projected onto the normal plane of the other,
    g_p' = g_p − (d/‖g_g‖²)·g_g,   g_g' = g_g − (d/‖g_p‖²)·g_p,
and g = g_p' + g_g' = (1 − d/‖g_p‖²)·g_p + (1 − d/‖g_g‖²)·g_g, so
    w_p = 1 − d/‖g_p‖²,   w_g = 1 − d/‖g_g‖²   (w = [1, 1] when d ≥ 0).
With two tasks the random task order of the paper does not matter: both projections use the
original gradients. This is GenRep's symmetric rule at damping λ = 0.
"""
from __future__ import annotations

from .registry import STRATEGIES, GramStats, Strategy, conflict_weights, telemetry


class PCGrad(Strategy):
    """Projecting conflicting gradients: w_p = 1 − d/‖g_p‖², w_g = 1 − d/‖g_g‖² when cos < 0."""

    name = "pcgrad"

    def _weights(self, s: GramStats, state, **opts):
        w, lam = conflict_weights(s, 0.0)
        return w, telemetry(s, w, lam)


STRATEGIES.register(PCGrad.name)(PCGrad())
