"""GenRep's gradient alignment. GenRep: Li, Yang, Wang, "Reconciling Visual Perception and
Generation in Diffusion Models", ICLR 2026 (https://openreview.net/forum?id=yKC3CaFg8K). Its code
is not public; the abstract says only that the alignment "symmetrically" modifies both tasks'
directions. The published rule below is read from public summaries of the paper (e.g.
https://en.papernotes.org/ICLR2026/image_generation/reconciling_visual_perception_and_generation_in_diffusion_models/,
and docs/method.md, "Combining the task gradients"); where they leave room, the choice is OUR READING and says so.

Each gradient is split against the other: g_p∥ = (d/‖g_g‖²)·g_g, g_p⊥ = g_p − g_p∥, and
g_g∥ = (d/‖g_p‖²)·g_p, g_g⊥ = g_g − g_g∥, with d = g_p·g_g, cos = d/(‖g_p‖‖g_g‖). The aligned
gradients are g_p' = g_p⊥ + λ_p·g_p∥ and g_g' = g_g⊥ + λ_g·g_g∥, and the update is
    g = w_p·g_p' + w_g·g_g'   ((w_p, w_g) = `task_weights`)
      = (w_p − w_g·(1−λ_g)·d/‖g_p‖²)·g_p + (w_g − w_p·(1−λ_p)·d/‖g_g‖²)·g_g,
coefficients from the Gram matrix alone, per segment, so the rule works sharded.

Rule "paper" (the published rule, the default): λ = α = ((1 + cos)/2)^k, k = `power` (2 in the
paper), at EVERY step whatever the sign of cos (cos = 0.5 keeps 0.5625 of the shared direction,
cos = −1 removes it all, cos = 1 keeps it whole), task weights (0.7, 0.3). k = 0 gives α = 1,
i.e. the weighted sum. Our reading: α is computed per segment (the granularity the harness sets)
and the projection uses the other task's *original* gradient, as PCGrad does.

Option `align` says which gradients are aligned (λ of the other side is 1, it is kept whole):
    "both"        λ_p = λ_g = λ     (symmetric, the paper's method)
    "generation"  λ_g = λ, λ_p = 1  (only g_g aligned: the paper's one-sided ablation)
    "perception"  λ_p = λ, λ_g = 1  (only g_p aligned: OURS, not in the paper; `onesided_p`)
The sweeps' `onesided` arm is "generation" (issue 30: it ran "perception" before). Where the rule
acts (every shared tensor, or the attention tensors with the rest summed) is the harness's
`strategy.scope` (genrep/strategies/scope.py), not an option of the rule.
`align` replaces the retired `one_sided` option, whose True damped only g_p∥ (w_p stayed 1): that
is align="perception" — NOT the paper's one-sided ablation ("generation"). Passing `one_sided`
is an error naming `align`.

Our earlier readings, kept as ablation variants (same `align` and `task_weights`; λ₀ = `damping`),
damp only on conflict: λ = 1 where cos ≥ 0, and where cos < 0
    "constant": λ = λ₀
    "cos":      λ = clip(λ₀·(1 + cos), 0, 1)  — the stronger the conflict, the more is removed
    "gradvac":  λ = clip(λ₀·(1 + cos)/(1 + φ̂), 0, 1), then φ̂ ← (1−β)·φ̂ + β·cos (β = `ema_beta`)
With equal task weights λ = 1 is `sum` and λ = 0 is `pcgrad` (both exactly). `damping`, `ema_beta`
are ignored by rule "paper" and `power` by the others (a search may sample them all at once).

"gradvac" follows the spirit of GradVac (Wang et al. 2021, "Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models", ICLR,
https://arxiv.org/abs/2010.05874): a per-segment target φ̂ (EMA of the observed cos, starting at 0)
sets how much conflict is normal. A cos below the target (1 + cos < 1 + φ̂) damps more than
λ₀, a cos above it damps less; with φ̂ = 0 it equals "cos". φ̂ is updated on every step, conflict
or not, as GradVac does. Unlike GradVac's closed-form re-targeting, λ stays a damping factor in
[0, 1], so the rule stays between `sum` and `pcgrad`.
State: φ̂ with the Gram's batch shape ([S] per segment). `state=None` means φ̂ = 0; the updated φ̂
is returned as telemetry["state"] and the caller passes it back as `state` on the next step.
Telemetry "damping" is the λ applied (α for "paper"), per segment.
"""
from __future__ import annotations

import math
import numbers

import torch

from .registry import STRATEGIES, GramStats, Strategy, aligned_matrix, on_conflict


def paper_alpha(s: GramStats, power: float) -> torch.Tensor:
    """α = ((1 + cos)/2)^k at every step (cos = 0 for a zero gradient: α = 2^−k, nothing to scale)."""
    return ((1 + s.cos) / 2).pow(power)


def constant_damping(s: GramStats, lam0: float, target: torch.Tensor) -> torch.Tensor:
    """λ = λ₀."""
    return torch.full_like(s.cos, lam0)


def cos_damping(s: GramStats, lam0: float, target: torch.Tensor) -> torch.Tensor:
    """λ = clip(λ₀·(1 + cos), 0, 1)."""
    return (lam0 * (1 + s.cos)).clamp(0, 1)


def gradvac_damping(s: GramStats, lam0: float, target: torch.Tensor) -> torch.Tensor:
    """λ = clip(λ₀·(1 + cos)/(1 + φ̂), 0, 1); 1 + φ̂ is floored at 1e-6 (φ̂ = −1 would divide by 0)."""
    return (lam0 * (1 + s.cos) / (1 + target).clamp_min(1e-6)).clamp(0, 1)


RULES = {"constant": constant_damping, "cos": cos_damping, "gradvac": gradvac_damping}  # on conflict
ALIGN = {"both": (True, True), "generation": (False, True), "perception": (True, False)}  # (p, g)


def sides(lam: torch.Tensor, align: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ_p, λ_g): λ on the aligned side(s), 1 (kept whole) on the other."""
    one = torch.ones_like(lam)
    on_p, on_g = ALIGN[align]
    return (lam if on_p else one), (lam if on_g else one)


class GenRep(Strategy):
    """The published alignment by default; the earlier damp-on-conflict rules as `rule` variants."""

    name = "genrep"
    defaults = {"rule": "paper", "power": 2.0, "task_weights": (0.7, 0.3), "align": "both",
                "damping": 0.5, "ema_beta": 0.01}
    renamed = {"one_sided": "'align' ('both', 'generation' or 'perception'); one_sided=True damped "
                            "only the perception gradient, i.e. align='perception'; the paper's "
                            "one-sided ablation is align='generation'"}

    def validate(self, opts):
        if opts["rule"] != "paper" and opts["rule"] not in RULES:
            raise ValueError(f"genrep: unknown rule {opts['rule']!r}; known: paper, {', '.join(RULES)}")
        if opts["align"] not in ALIGN:
            raise ValueError(f"genrep: unknown align {opts['align']!r}; known: {', '.join(ALIGN)}")
        k = opts["power"]
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not (math.isfinite(k) and k >= 0):
            raise ValueError(f"genrep: power must be a finite number ≥ 0, got {k!r}")
        if not 0.0 <= opts["damping"] <= 1.0:
            raise ValueError(f"genrep: damping must lie in [0, 1], got {opts['damping']}")
        if not 0.0 < opts["ema_beta"] <= 1.0:
            raise ValueError(f"genrep: ema_beta must lie in (0, 1], got {opts['ema_beta']}")

    def init_state(self, num_segments: int, **options):
        """φ̂ = 0 per segment for rule "gradvac"; None for the stateless rules."""
        opts = self.check_options(options)
        return torch.zeros(num_segments, dtype=torch.float64) if opts["rule"] == "gradvac" else None

    def _aligned(self, s: GramStats, state, rule, power, align, damping, ema_beta):
        extra = {}
        if rule == "paper":
            lam = paper_alpha(s, float(power))
        else:
            target = torch.zeros_like(s.cos) if state is None else state.to(s.cos)
            lam = on_conflict(s, RULES[rule](s, damping, target))
            if rule == "gradvac":
                extra["state"] = (1 - ema_beta) * target + ema_beta * s.cos
        return aligned_matrix(s, *sides(lam, align)), lam, extra


STRATEGIES.register(GenRep.name)(GenRep())
