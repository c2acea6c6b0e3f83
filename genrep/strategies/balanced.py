"""Summing with balanced gradient norms: the `sum` arm with neither task dominating by scale.

Per segment, u = ḡ·(ĝ_p + ĝ_g) with ĝ_i = g_i/‖g_i‖ and ḡ = (‖g_p‖ + ‖g_g‖)/2: each task
contributes a vector of the same length ḡ, the mean of the two norms, so the update keeps the
scale of the two gradients together while their directions count equally. As Gram coefficients,
    w_p = ḡ/‖g_p‖ = ḡ/√G_00,   w_g = ḡ/‖g_g‖ = ḡ/√G_11,
then the task weights (t_p, t_g) as for every strategy: u = t_p·w_p·g_p + t_g·w_g·g_g.
A segment that only one task reaches (the other's norm is 0, e.g. a tensor of the decoder that
the perception loss never touches) has nothing to balance: that task keeps its gradient whole
(w = 1, as in `sum`) and the absent one gets w = 0; both 0: w = (0, 0), no update, never NaN.
Norm balancing in the spirit of GradNorm (Chen et al. 2018, arXiv:1711.02257) and of IMTL-G's
unit-vector step (Liu et al. 2021), in closed form; no alignment, so cos plays no part.
"""
from __future__ import annotations

import torch

from .registry import STRATEGIES, GramStats, Strategy


def balanced_scales(s: GramStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(ḡ/‖g_p‖, ḡ/‖g_g‖), ḡ = (‖g_p‖ + ‖g_g‖)/2 where both norms are > 0; else 1 for the
    present task and 0 for a zero one."""
    both = (s.norm_p > 0) & (s.norm_g > 0)
    tiny = torch.finfo(s.cos.dtype).tiny
    mean = (s.norm_p + s.norm_g) / 2
    lone = lambda n: (n > 0).to(n.dtype)  # noqa: E731  (1 if the task is there, else 0)
    return (torch.where(both, mean / s.norm_p.clamp_min(tiny), lone(s.norm_p)),
            torch.where(both, mean / s.norm_g.clamp_min(tiny), lone(s.norm_g)))


class SumBalanced(Strategy):
    """M = diag(ḡ/‖g_p‖, ḡ/‖g_g‖): each gradient rescaled to the mean norm, then summed."""

    name = "sum_balanced"

    def _aligned(self, s: GramStats, state, **opts):
        a_p, a_g = balanced_scales(s)
        zero = torch.zeros_like(a_p)
        m = torch.stack([torch.stack([a_p, zero], -1), torch.stack([zero, a_g], -1)], -2)
        return m, torch.ones_like(s.cos), {}


STRATEGIES.register(SumBalanced.name)(SumBalanced())
