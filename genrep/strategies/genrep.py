"""GenRep's gradient alignment — OUR READING. GenRep (Li, Yang, Wang, ICLR 2026) says only that the
alignment modifies both task directions *symmetrically* and adaptively; its exact rule and code
are not public, so the rules below are our interpretation (see DESIGN.md, "Gradient alignment").

Each gradient is split against the other: g_p∥ = (d/‖g_g‖²)·g_g, g_p⊥ = g_p − g_p∥, and
g_g∥ = (d/‖g_p‖²)·g_p, g_g⊥ = g_g − g_g∥, with d = g_p·g_g.
    cos ≥ 0:  g = g_p + g_g
    cos < 0:  g = (g_p⊥ + λ·g_p∥) + (g_g⊥ + λ·g_g∥)
              ⇒ w_p = 1 − (1−λ)·d/‖g_p‖²,  w_g = 1 − (1−λ)·d/‖g_g‖²
λ = 1 is `sum`, λ = 0 is `pcgrad` (both exactly). Damping rules (option `rule`, λ₀ = `damping`):
    "constant": λ = λ₀
    "cos":      λ = clip(λ₀·(1 + cos), 0, 1)  — the stronger the conflict, the more is removed
    "gradvac":  λ = clip(λ₀·(1 + cos)/(1 + φ̂), 0, 1), then φ̂ ← (1−β)·φ̂ + β·cos (β = `ema_beta`)
`one_sided=True` damps only the perception gradient's conflicting part g_p∥ (g_g is kept whole):
g = (g_p⊥ + λ·g_p∥) + g_g ⇒ w_p = 1, w_g = 1 − (1−λ)·d/‖g_g‖².

"gradvac" follows the spirit of GradVac (Wang et al. 2021, "Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models", ICLR,
https://arxiv.org/abs/2010.05874): a per-segment target φ̂ (EMA of the observed cos, starting at 0)
sets how much conflict is normal. A cos below the target (1 + cos < 1 + φ̂) damps more than
λ₀, a cos above it damps less; with φ̂ = 0 it equals "cos". φ̂ is updated on every step, conflict
or not, as GradVac does. Unlike GradVac's closed-form re-targeting, λ stays a damping factor in
[0, 1], so the rule stays between `sum` and `pcgrad`.
State: φ̂ with the Gram's batch shape ([S] per segment). `state=None` means φ̂ = 0; the updated φ̂
is returned as telemetry["state"] and the caller passes it back as `state` on the next step.
"""
from __future__ import annotations

import torch

from .registry import STRATEGIES, GramStats, Strategy, conflict_weights, telemetry


def constant_damping(s: GramStats, lam0: float, target: torch.Tensor) -> torch.Tensor:
    """λ = λ₀."""
    return torch.full_like(s.cos, lam0)


def cos_damping(s: GramStats, lam0: float, target: torch.Tensor) -> torch.Tensor:
    """λ = clip(λ₀·(1 + cos), 0, 1)."""
    return (lam0 * (1 + s.cos)).clamp(0, 1)


def gradvac_damping(s: GramStats, lam0: float, target: torch.Tensor) -> torch.Tensor:
    """λ = clip(λ₀·(1 + cos)/(1 + φ̂), 0, 1); 1 + φ̂ is floored at 1e-6 (φ̂ = −1 would divide by 0)."""
    return (lam0 * (1 + s.cos) / (1 + target).clamp_min(1e-6)).clamp(0, 1)


RULES = {"constant": constant_damping, "cos": cos_damping, "gradvac": gradvac_damping}


class GenRep(Strategy):
    """Symmetric damping of the conflicting components; see the module docstring for the formulas."""

    name = "genrep"
    defaults = {"damping": 0.5, "rule": "constant", "one_sided": False, "ema_beta": 0.01}

    def validate(self, opts):
        if not 0.0 <= opts["damping"] <= 1.0:
            raise ValueError(f"genrep: damping must lie in [0, 1], got {opts['damping']}")
        if opts["rule"] not in RULES:
            raise ValueError(f"genrep: unknown rule {opts['rule']!r}; known: {', '.join(RULES)}")
        if not 0.0 < opts["ema_beta"] <= 1.0:
            raise ValueError(f"genrep: ema_beta must lie in (0, 1], got {opts['ema_beta']}")

    def init_state(self, num_segments: int, **options):
        """φ̂ = 0 per segment for rule "gradvac"; None for the stateless rules."""
        opts = self.check_options(options)
        return torch.zeros(num_segments, dtype=torch.float64) if opts["rule"] == "gradvac" else None

    def _weights(self, s: GramStats, state, damping, rule, one_sided, ema_beta):
        target = torch.zeros_like(s.cos) if state is None else state.to(s.cos)
        w, lam = conflict_weights(s, RULES[rule](s, damping, target), one_sided)
        tel = telemetry(s, w, lam)
        if rule == "gradvac":
            tel["state"] = (1 - ema_beta) * target + ema_beta * s.cos
        return w, tel


STRATEGIES.register(GenRep.name)(GenRep())
