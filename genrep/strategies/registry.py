"""A strict name → strategy registry, and the interface every strategy shares.

Every strategy maps a 2×2 Gram matrix G = [[‖g_p‖², d], [d, ‖g_g‖²]] (d = g_p·g_g, batched over
segments as [..., 2, 2]) to coefficients w = [w_p, w_g], and the combined gradient is
w_p·g_p + w_g·g_g. Only G crosses ranks in distributed training, so G is all that a rule sees.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from genrep.registry import Registry

Telemetry = dict[str, torch.Tensor]


STRATEGIES = Registry("strategy")


class GramStats(NamedTuple):
    """Per-segment quantities read off a Gram matrix; all have the Gram's batch shape."""

    sq_p: torch.Tensor  # ‖g_p‖²
    dot: torch.Tensor  # d = g_p·g_g
    sq_g: torch.Tensor  # ‖g_g‖²
    norm_p: torch.Tensor
    norm_g: torch.Tensor
    cos: torch.Tensor  # d / (‖g_p‖‖g_g‖); 0 where either norm is 0
    conflict: torch.Tensor  # bool, cos < 0


def gram_stats(gram: torch.Tensor) -> GramStats:
    """Norms and cos = d/(‖g_p‖‖g_g‖) from G; a zero gradient gives cos = 0 (no conflict), never NaN."""
    if gram.shape[-2:] != (2, 2):
        raise ValueError(f"gram must have shape [..., 2, 2], got {tuple(gram.shape)}")
    sq_p, dot, sq_g = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
    norm_p, norm_g = sq_p.clamp_min(0).sqrt(), sq_g.clamp_min(0).sqrt()
    den = norm_p * norm_g
    tiny = torch.finfo(gram.dtype).tiny
    cos = torch.where(den > 0, dot / den.clamp_min(tiny), torch.zeros_like(dot)).clamp(-1, 1)
    return GramStats(sq_p, dot, sq_g, norm_p, norm_g, cos, cos < 0)


def conflict_weights(s: GramStats, lam, one_sided: bool = False):
    """Where cos < 0: w_p = 1 − (1−λ)·d/‖g_p‖², w_g = 1 − (1−λ)·d/‖g_g‖²; elsewhere w = [1, 1] and λ = 1.

    This is (g_p⊥ + λ·g_p∥) + (g_g⊥ + λ·g_g∥): g_g∥ = (d/‖g_p‖²)·g_p lands on w_p and
    g_p∥ = (d/‖g_g‖²)·g_g on w_g. one_sided damps g_p∥ only, so g_g∥ is kept and w_p = 1.
    Returns (w [..., 2], λ applied [...]).
    """
    lam = torch.as_tensor(lam, dtype=s.cos.dtype, device=s.cos.device)
    lam = torch.where(s.conflict, lam, torch.ones_like(s.cos))
    tiny = torch.finfo(s.cos.dtype).tiny
    w_p = 1 - (1 - lam) * s.dot / s.sq_p.clamp_min(tiny)
    w_g = 1 - (1 - lam) * s.dot / s.sq_g.clamp_min(tiny)
    if one_sided:
        w_p = torch.ones_like(w_p)
    w = torch.where(s.conflict[..., None], torch.stack([w_p, w_g], -1), torch.ones_like(w_p)[..., None])
    return w, lam


def telemetry(s: GramStats, w: torch.Tensor, lam: torch.Tensor) -> Telemetry:
    """Per-segment cos, norms, conflict (0./1.), damping λ applied, and the coefficients."""
    return {"cos": s.cos, "norm_p": s.norm_p, "norm_g": s.norm_g,
            "conflict": s.conflict.to(s.cos.dtype), "damping": lam,
            "w_p": w[..., 0], "w_g": w[..., 1]}


class Strategy:
    """Base for a combination rule: subclasses set `name`, `defaults` and implement `_weights`."""

    name: str = ""
    defaults: dict[str, Any] = {}
    needs_task_grads: bool = True  # False: the harness may take one backward of L_p + L_g

    def weights(self, gram: torch.Tensor, state=None, **options) -> tuple[torch.Tensor, Telemetry]:
        """(w [..., 2], telemetry) for gram [..., 2, 2]; a stateful rule returns its next state as telemetry['state']."""
        return self._weights(gram_stats(gram), state, **self.check_options(options))

    def init_state(self, num_segments: int, **options):
        """The state for the first step (None for stateless rules)."""
        return None

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults overridden by `options`; an unknown option is a TypeError naming it."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(f"strategy {self.name!r}: unknown option(s) {unknown}; known: {known}")
        opts = {**self.defaults, **options}
        self.validate(opts)
        return opts

    def validate(self, opts: dict[str, Any]) -> None:
        """Cross-checks of option values; raise ValueError on a bad one."""

    def _weights(self, s: GramStats, state, **opts) -> tuple[torch.Tensor, Telemetry]:
        raise NotImplementedError
