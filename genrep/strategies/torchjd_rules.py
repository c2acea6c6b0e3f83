"""The field's Gramian-based conflict methods, from torchjd (https://torchjd.org, pinned 0.18.0).

torchjd's `Weighting` classes map the m×m Gramian G = J·Jᵀ of the task gradients to weights w,
and its aggregator returns wᵀJ: exactly this package's interface (per-segment 2×2 Gram → [w_p, w_g]),
so each strategy here is a thin adapter that calls the library on every segment's Gram. Grams are
sums over coordinates, so partial Grams over shards add up to the full one and every method runs
sharded like `sum`/`pcgrad`/`genrep` (docs/strategies.md).

    name         torchjd class           paper
    upgrad       UPGradWeighting         Quinton & Rey 2024, Jacobian Descent, arXiv:2406.16232
    mgda         MGDAWeighting           Désidéri 2012; Sener & Koltun 2018, arXiv:1810.04650
    dualproj     DualProjWeighting       Lopez-Paz & Ranzato 2017 (GEM, eq. 11), arXiv:1706.08840
    aligned_mtl  AlignedMTLWeighting     Senushkin et al. 2023, CVPR, arXiv:2305.19000
    imtl_g       IMTLGWeighting          Liu et al. 2021, ICLR (generalised in arXiv:2406.16232)
    cagrad       CAGrad (closed form)    Liu et al. 2021, NeurIPS, arXiv:2110.14048
    config       ConFIG (aggregator)     Liu et al. 2025, ICLR, arXiv:2408.11104
    gradvac      GradVacWeighting        Wang et al. 2021, ICLR, arXiv:2010.05874   (stateful)
    fairgrad     FairGradWeighting       Ban & Ji 2024, ICML, arXiv:2402.15638

Scale: w is torchjd's, not renormalised (UPGrad's default preference is the mean, so its update is
about half `sum`'s). `task_weights` (t_p, t_g) applies on top as t_i·w_i: the method's weighted task
gradients w_p·g_p and w_g·g_g are the "aligned" gradients of registry.py (M = diag(w)); at the
default (1, 1) the update is torchjd's aggregator exactly. `pref_vector`, where torchjd has one, is
the method's own preference (UPGrad weighs the *projected* gradients with it).

Three departures, each tested against the library:
- `cagrad` solves CAGrad's two-task problem in closed form (`cagrad_weights`), batched over
  segments: torchjd's CAGradWeighting builds and solves a cvxpy problem per call (~10 ms, 1.5 s a
  step at 150 segments, and cvxpy + clarabel as a runtime dependency). Its CLARABEL solution is
  accurate to ~1e-4 in w; the closed form is the exact minimiser (its objective is never higher).
- `config`: torchjd ships ConFIG as an aggregator of J, not a Weighting. Its output is a
  combination of J's rows and it commutes with isometries of the row space, so it is applied to
  rows R with R·Rᵀ = G (G's symmetric square root) and w solves Rᵀw = ConFIG(R).
- `fairgrad` gives a task with a zero gradient weight 0 and solves for the other alone: torchjd's
  FairGrad solves G·x = x^(−1/α), which has no solution for a zero row (its solver wanders to
  x ≈ 500 at the iteration cap); the update is the same, the rows being decoupled.

Absolute thresholds in torchjd (options here, torchjd's defaults): UPGrad's and DualProj's
projector and CAGrad treat a Gram of trace < `norm_eps` = 1e-4 as zero (UPGrad/DualProj then return
the plain preference, i.e. the mean; CAGrad returns w = 0, no update), and GradVac adds `eps` =
1e-8 to ‖g_i‖‖g_j‖. Per-tensor segments often have ‖g_p‖² + ‖g_g‖² below 1e-4: pass a smaller
`norm_eps` (e.g. 1e-30) there. MGDA and CAGrad give no update on a segment where either task's
gradient is zero (0 is in the gradients' convex hull: Pareto-stationary), as in torchjd.

`gradvac` here is torchjd's GradVac (closed-form re-targeting of cos towards an EMA target φ̂),
not genrep's rule="gradvac" damping. Its state is φ̂ per segment as [S, 2, 2] float64 on the CPU
(torchjd's m×m φ̂; the diagonal is unused); `state=None` is φ̂ = 0, as torchjd's first call. For
m = 2 its random task order is a permutation of one task, which draws nothing from torch's RNG.
`config` is ConFIG, the method, not a sweep config.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .registry import COMMON_DEFAULTS, STRATEGIES, GramStats, Strategy

Check = Callable[[str, str, Any], None]  # (strategy, option, value) → None, or ValueError


def tjd():
    """torchjd.aggregation, imported on first use: with cvxpy installed it takes ~2 s to import."""
    import torchjd.aggregation
    return torchjd.aggregation


# --- option checks -------------------------------------------------------------------------------

def real(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
         integer: bool = False, none: bool = False) -> Check:
    """A finite number (an int if `integer`) in [lo, hi] ((lo, hi] if `lo_open`), or None if `none`."""
    kind = "an integer" if integer else "a finite number"
    where = f"{'(' if lo_open else '['}{lo}, {hi}]"

    def check(strategy, option, v):
        if v is None and none:
            return
        ok = (not isinstance(v, bool) and isinstance(v, numbers.Integral if integer else numbers.Real)
              and math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi)
        if not ok:
            raise ValueError(f"{strategy}: {option} must be {kind} in {where}"
                             f"{' or None' if none else ''}, got {v!r}")
    return check


def choice(*values: str) -> Check:
    def check(strategy, option, v):
        if v not in values:
            raise ValueError(f"{strategy}: unknown {option} {v!r}; known: {', '.join(values)}")
    return check


def preference(strategy, option, v) -> None:
    """None (torchjd's default) or (p_p, p_g): two finite non-negative numbers, not both 0."""
    if v is None:
        return
    try:
        p = tuple(v)
    except TypeError:
        p = (v,)
    if (len(p) != 2 or any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in p)
            or not all(math.isfinite(x) and x >= 0 for x in p) or p[0] == p[1] == 0):
        raise ValueError(f"{strategy}: {option} must be None or two finite non-negative numbers "
                         f"(p_p, p_g), not both 0; got {v!r}")


def pref_tensor(pref, dtype) -> torch.Tensor | None:
    return None if pref is None else torch.tensor([float(x) for x in pref], dtype=dtype)


# --- solvers: gram [S, 2, 2] on the CPU, state → (w [S, 2], next state) -------------------------

def per_segment(make: Callable[..., Any]):
    """Call torchjd's weighting `make(dtype, **options)` on each segment's 2×2 Gram (~0.03–1 ms each)."""
    def solve(gram, state, **opts):
        weighting = make(gram.dtype, **opts)
        return torch.stack([weighting(g) for g in gram]), None
    return solve


def projector(norm_eps, reg_eps):
    from torchjd.linalg import QuadprogProjector
    return QuadprogProjector(norm_eps=norm_eps, reg_eps=reg_eps)


def gram_rows(gram: torch.Tensor) -> torch.Tensor:
    """R = V·√Λ·Vᵀ, the symmetric square root: rows with R·Rᵀ = G (negative rounding clamped to 0)."""
    lam, v = torch.linalg.eigh(gram)
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def config_solve(gram, state, pref_vector):
    """ConFIG on rows R with the segment's Gram; R is symmetric, so Rᵀw = v is R·w = v."""
    aggregate = tjd().ConFIG(pref_tensor(pref_vector, gram.dtype))
    rows = [gram_rows(g) for g in gram]
    return torch.stack([torch.linalg.pinv(r) @ aggregate(r) for r in rows]), None


def fairgrad_solve(gram, state, alpha, max_iters):
    """torchjd's FairGrad on the sub-Gram of the tasks with a non-zero gradient; weight 0 elsewhere."""
    weighting = tjd().FairGradWeighting(alpha=alpha, max_iters=max_iters)
    w = gram.new_zeros(gram.shape[0], 2)
    for s, g in enumerate(gram):
        live = g.diagonal() > 0
        if live.any():
            w[s, live] = weighting(g[live][:, live])
    return w, None


def gradvac_solve(gram, state, beta, eps):
    """torchjd's GradVac per segment, its φ̂ loaded from and read back into `state` [S, 2, 2]."""
    phi = torch.zeros(gram.shape[0], 2, 2, dtype=torch.float64) if state is None else state
    weighting = tjd().GradVacWeighting(beta=beta, eps=eps)
    w, out = [], []
    for g, p in zip(gram, phi.detach().cpu()):
        # torchjd keeps φ̂ in the buffer `_phi_t` keyed by (m, dtype); a mismatched key resets it
        weighting._phi_t, weighting._state_key = p.to(g.dtype).clone(), (2, g.dtype)
        w.append(weighting(g))
        out.append(weighting._phi_t.to(torch.float64))
    return torch.stack(w), torch.stack(out)


def cagrad_weights(gram: torch.Tensor, c: float, norm_eps: float) -> torch.Tensor:
    """CAGrad (Liu et al. 2021, Alg. 1) for two tasks in closed form, w [..., 2] for gram [..., 2, 2].

    As torchjd's CAGradWeighting: Ĝ = G/tr G (0 if tr G < norm_eps), g₀ = mean gradient,
    √φ = c·‖g₀‖ = c·√(1ᵀĜ1)/2; minimise F(t) = wᵀĜ1/2 + √φ·√(wᵀĜw) over w = (t, 1−t), t ∈ [0, 1];
    then w = ½ + (√φ/‖g_w‖)·w_opt, or 0 if ‖g_w‖ < norm_eps (0 is nearly in the hull).
    With k = (Ĝ₀₀ − Ĝ₁₁)/2 (the slope of the linear term), wᵀĜw = A·u² + det Ĝ/A, u = t − t*,
    A = ‖g₁ − g₂‖²/tr G, t* = (Ĝ₁₁ − Ĝ₀₁)/A. F is convex; F′ = k + √φ·A·u/√(A·u² + det/A) = 0 at
    u = −k·√(det/(φA − k²))/A when φA > k² (then clip t to [0, 1]); else F is monotone and
    t = 0 (k > 0) or 1 (k < 0). A = 0 (equal gradients) leaves t free: t = ½.
    """
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    small = (trace < norm_eps)[..., None, None]
    gn = torch.where(small, torch.zeros_like(gram), gram / torch.where(small, 1.0, trace[..., None, None]))
    g00, g01, g11 = gn[..., 0, 0], gn[..., 0, 1], gn[..., 1, 1]
    phi = c * c * (g00 + 2 * g01 + g11).clamp_min(0) / 4
    k = (g00 - g11) / 2
    a = (g00 - 2 * g01 + g11).clamp_min(0)
    det = (g00 * g11 - g01 * g01).clamp_min(0)
    room = phi * a - k * k
    inside = (a > 0) & (room > 0)
    a_, room_ = torch.where(a > 0, a, 1.0), torch.where(inside, room, 1.0)
    t_inside = ((g11 - g01) / a_ - k * (det / room_).sqrt() / a_).clamp(0, 1)
    t_edge = torch.where(k > 0, 0.0, torch.where(k < 0, 1.0, 0.5)).to(gn)
    t = torch.where(inside, t_inside, t_edge)
    w = torch.stack([t, 1 - t], -1)
    norm_w = torch.einsum("...i,...ij,...j->...", w, gn, w).clamp_min(0).sqrt()
    ok = norm_w >= norm_eps
    out = 0.5 + (phi.sqrt() / torch.where(ok, norm_w, 1.0))[..., None] * w
    return torch.where(ok[..., None], out, torch.zeros_like(out))


def cagrad_solve(gram, state, c, norm_eps):
    return cagrad_weights(gram, c, norm_eps), None


# --- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    solve: Callable  # (gram [S, 2, 2] on the CPU, state, **options) → (w [S, 2], next state | None)
    options: dict[str, tuple[Any, Check]] = field(default_factory=dict)  # name → (default, check)
    stateful: bool = False


PREF = {"pref_vector": (None, preference)}
# > 0, unlike torchjd's ≥ 0: norm_eps = 0 divides 0 by 0 for a zero Gram, reg_eps = 0 fails the QP
PROJECTOR = {"norm_eps": (1e-4, real(0, lo_open=True)), "reg_eps": (1e-4, real(0, lo_open=True))}

METHODS: dict[str, Method] = {
    "upgrad": Method(per_segment(lambda dtype, pref_vector, norm_eps, reg_eps: tjd().UPGradWeighting(
        pref_tensor(pref_vector, dtype), projector(norm_eps, reg_eps))), {**PREF, **PROJECTOR}),
    "mgda": Method(per_segment(lambda dtype, **o: tjd().MGDAWeighting(**o)),
                   {"epsilon": (1e-3, real(0, lo_open=True)), "max_iters": (100, real(1, integer=True))}),
    "dualproj": Method(per_segment(lambda dtype, pref_vector, norm_eps, reg_eps: tjd().DualProjWeighting(
        pref_tensor(pref_vector, dtype), projector(norm_eps, reg_eps))), {**PREF, **PROJECTOR}),
    "aligned_mtl": Method(per_segment(lambda dtype, pref_vector, scale_mode: tjd().AlignedMTLWeighting(
        pref_tensor(pref_vector, dtype), scale_mode)),
        {**PREF, "scale_mode": ("min", choice("min", "median", "rmse"))}),
    "imtl_g": Method(per_segment(lambda dtype: tjd().IMTLGWeighting())),
    # c = 0.5: LibMTL's default (the paper tunes c in [0.1, 0.9]; torchjd has no default)
    "cagrad": Method(cagrad_solve, {"c": (0.5, real(0)), "norm_eps": (1e-4, real(0, lo_open=True))}),
    "config": Method(config_solve, PREF),
    "gradvac": Method(gradvac_solve, {"beta": (0.5, real(0, 1)), "eps": (1e-8, real(0))}, stateful=True),
    # alpha = 1: proportional fairness, G·x = 1/x (the paper also reports alpha = 2; torchjd has no default)
    "fairgrad": Method(fairgrad_solve, {"alpha": (1.0, real(0)),
                                        "max_iters": (None, real(1, integer=True, none=True))}),
}


class TorchJD(Strategy):
    """One torchjd method: its weights w per segment, as M = diag(w) (see the module docstring)."""

    def __init__(self, name: str, method: Method):
        self.name, self.method = name, method
        self.defaults = {**COMMON_DEFAULTS, **{k: d for k, (d, _) in method.options.items()}}

    def validate(self, opts):
        for option, (_, check) in self.method.options.items():
            check(self.name, option, opts[option])

    def init_state(self, num_segments: int, **options):
        """φ̂ = 0 [S, 2, 2] float64 for the stateful methods (gradvac); None for the others."""
        self.check_options(options)
        return torch.zeros(num_segments, 2, 2, dtype=torch.float64) if self.method.stateful else None

    def resolved_weights(self, gram: torch.Tensor, state, opts):
        w, tel = super().resolved_weights(gram, state, opts)
        del tel["damping"]  # no damping λ in these methods: the report's column stays empty
        return w, tel

    def _aligned(self, s: GramStats, state, **opts):
        gram = torch.stack([s.sq_p, s.dot, s.dot, s.sq_g], -1).unflatten(-1, (2, 2))
        batch = gram.shape[:-2]
        if state is not None and self.method.stateful:
            if tuple(state.shape) != (*batch, 2, 2):
                raise ValueError(f"{self.name}: state must be [S, 2, 2] = {(*batch, 2, 2)} as "
                                 f"init_state gives, got {tuple(state.shape)}")
            state = state.reshape(-1, 2, 2)
        w, state = self.method.solve(gram.detach().reshape(-1, 2, 2).cpu(), state, **opts)
        extra = {} if state is None else {"state": state.reshape(*batch, 2, 2)}
        no_damping = torch.ones_like(s.cos)  # the base wants a λ; `weights` drops it from telemetry
        return torch.diag_embed(w.reshape(*batch, 2).to(gram)), no_damping, extra


for _name, _method in METHODS.items():
    STRATEGIES.register(_name)(TorchJD(_name, _method))
