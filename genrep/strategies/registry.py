"""A strict name → strategy registry, and the interface every strategy shares.

Every strategy maps a 2×2 Gram matrix G = [[‖g_p‖², d], [d, ‖g_g‖²]] (d = g_p·g_g, batched over
segments as [..., 2, 2]) to coefficients w = [w_p, w_g], and the combined gradient is
w_p·g_p + w_g·g_g. Only G crosses ranks in distributed training, so G is all that a rule sees.

Every rule first aligns each task gradient against the other, g_p' = g_p⊥ + λ_p·g_p∥ and
g_g' = g_g⊥ + λ_g·g_g∥ (g_p∥ = (d/‖g_g‖²)·g_g, g_g∥ = (d/‖g_p‖²)·g_p, ⊥ the rest), then applies the
task weights: update = w_p·g_p' + w_g·g_g' (`task_weights`, an option of every strategy). Hence
    coefficient on g_p:  w_p − w_g·(1−λ_g)·d/‖g_p‖²
    coefficient on g_g:  w_g − w_p·(1−λ_p)·d/‖g_g‖²
`sum` is λ_p = λ_g = 1; PCGrad is λ = 0 on conflict; `genrep` picks λ by its rule.
"""
from __future__ import annotations

import math
import numbers
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


def task_weights_option(value, strategy: str) -> tuple[float, float]:
    """(w_p, w_g) as floats: two finite, non-negative numbers, not both 0; or one number
    w ∈ [0, 1], the perception share, meaning (w, 1 − w) (a scalar Optuna can search); else
    ValueError."""
    try:
        w = tuple(value)
    except TypeError:
        w = (value,)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1:
            w = (value, 1 - value)
    if (len(w) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in w)
            or not all(math.isfinite(v) and v >= 0 for v in w) or w[0] == w[1] == 0):
        raise ValueError(f"{strategy}: task_weights must be two finite non-negative numbers "
                         f"(w_p, w_g), not both 0, or one share w_p in [0, 1]; got {value!r}")
    return float(w[0]), float(w[1])


def parallel_coeffs(s: GramStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/‖g_g‖², d/‖g_p‖²): g_p∥ = (d/‖g_g‖²)·g_g and g_g∥ = (d/‖g_p‖²)·g_p.

    0 where either gradient is 0 (cos = 0 there: no shared direction to rescale), never NaN/inf.
    """
    tiny = torch.finfo(s.cos.dtype).tiny
    both = (s.norm_p > 0) & (s.norm_g > 0)
    zero = torch.zeros_like(s.dot)
    return (torch.where(both, s.dot / s.sq_g.clamp_min(tiny), zero),
            torch.where(both, s.dot / s.sq_p.clamp_min(tiny), zero))


def aligned_matrix(s: GramStats, lam_p, lam_g) -> torch.Tensor:
    """M [..., 2, 2] with [g_p', g_g'] = M·[g_p, g_g] for g_p' = g_p⊥ + λ_p·g_p∥, g_g' = g_g⊥ + λ_g·g_g∥.

    g_p' = g_p − (1−λ_p)·g_p∥ = g_p − (1−λ_p)(d/‖g_g‖²)·g_g  → row [1, −(1−λ_p)·d/‖g_g‖²]
    g_g' = g_g − (1−λ_g)·g_g∥ = g_g − (1−λ_g)(d/‖g_p‖²)·g_p  → row [−(1−λ_g)·d/‖g_p‖², 1]
    λ = 1 keeps a gradient whole; λ = 0 is PCGrad's projection onto the other's normal plane.
    """
    c_p, c_g = parallel_coeffs(s)
    one = torch.ones_like(s.cos)
    row_p = torch.stack([one, -(1 - lam_p) * c_p], -1)
    row_g = torch.stack([-(1 - lam_g) * c_g, one], -1)
    return torch.stack([row_p, row_g], -2)


def identity_matrix(s: GramStats) -> torch.Tensor:
    """M = I per segment: both gradients kept as they are."""
    eye = torch.eye(2, dtype=s.cos.dtype, device=s.cos.device)
    return eye.expand(*s.cos.shape, 2, 2)


def on_conflict(s: GramStats, lam) -> torch.Tensor:
    """λ where cos < 0, 1 elsewhere: the damp-only-on-conflict readings (PCGrad: λ = 0)."""
    lam = torch.as_tensor(lam, dtype=s.cos.dtype, device=s.cos.device)
    return torch.where(s.conflict, lam, torch.ones_like(s.cos))


def weigh_tasks(m: torch.Tensor, task_weights: tuple[float, float]) -> torch.Tensor:
    """w = w_p·M[0] + w_g·M[1]: the update w_p·g_p' + w_g·g_g' as coefficients on [g_p, g_g]."""
    w_p, w_g = task_weights
    return w_p * m[..., 0, :] + w_g * m[..., 1, :]


def telemetry(s: GramStats, w: torch.Tensor, lam: torch.Tensor) -> Telemetry:
    """Per-segment cos, norms, conflict (0./1.), damping λ applied, and the coefficients."""
    return {"cos": s.cos, "norm_p": s.norm_p, "norm_g": s.norm_g,
            "conflict": s.conflict.to(s.cos.dtype), "damping": lam,
            "w_p": w[..., 0], "w_g": w[..., 1]}


COMMON_DEFAULTS: dict[str, Any] = {"task_weights": (1.0, 1.0)}


class Strategy:
    """Base for a combination rule: subclasses set `name`, `defaults` and implement `_aligned`.

    A rule only says how each task gradient is aligned against the other (a 2×2 matrix M per
    segment: [g_p', g_g'] = M·[g_p, g_g]); the base then applies the task weights, an option of
    every strategy (`task_weights` = (w_p, w_g), default (1, 1), merged into each subclass's
    `defaults`): update = w_p·g_p' + w_g·g_g', i.e. w = w_p·M[0] + w_g·M[1]. So no rule
    re-implements the weighting, and for `pcgrad` the weights come after projecting.
    """

    name: str = ""
    defaults: dict[str, Any] = dict(COMMON_DEFAULTS)
    renamed: dict[str, str] = {}  # a retired option → what replaced it (the error names it)
    needs_task_grads: bool = True  # False: the harness may take one backward of the weighted losses

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.defaults = {**COMMON_DEFAULTS, **cls.__dict__.get("defaults", {})}

    def weights(self, gram: torch.Tensor, state=None, **options) -> tuple[torch.Tensor, Telemetry]:
        """(w [..., 2], telemetry) for gram [..., 2, 2]; a stateful rule returns its next state as telemetry['state']."""
        return self.resolved_weights(gram, state, self.check_options(options))

    def resolved_weights(self, gram: torch.Tensor, state, opts: dict[str, Any]) -> tuple[torch.Tensor, Telemetry]:
        """:meth:`weights` with options that :meth:`check_options` already resolved (a training
        loop resolves them once, not every step)."""
        opts = dict(opts)
        task_weights = opts.pop("task_weights")
        s = gram_stats(gram)
        m, lam, extra = self._aligned(s, state, **opts)
        w = weigh_tasks(m, task_weights)
        return w, {**telemetry(s, w, lam), **extra}

    def loss_weights(self, **options) -> tuple[float, float]:
        """(w_p, w_g), the validated `task_weights`, for the harness's one-backward path.

        A strategy with `needs_task_grads = False` (`sum`) has M = I, so its combined gradient
        w_p·g_p + w_g·g_g is the gradient of w_p·L_p + w_g·L_g: one backward of that loss gives it,
        no task gradients needed. For a strategy that needs task gradients the weights are applied
        after the rule's alignment, so one backward of the weighted losses is NOT that strategy.
        """
        return self.check_options(options)["task_weights"]

    def init_state(self, num_segments: int, **options):
        """The state for the first step (None for stateless rules)."""
        return None

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults overridden by `options`; an unknown or retired option is a TypeError naming it."""
        for old in sorted(set(options) & set(self.renamed)):
            raise TypeError(f"strategy {self.name!r}: option {old!r} was replaced by {self.renamed[old]}")
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(f"strategy {self.name!r}: unknown option(s) {unknown}; known: {known}")
        opts = {**self.defaults, **options}
        opts["task_weights"] = task_weights_option(opts["task_weights"], self.name)
        self.validate(opts)
        return opts

    def validate(self, opts: dict[str, Any]) -> None:
        """Cross-checks of option values; raise ValueError on a bad one."""

    def _aligned(self, s: GramStats, state, **opts) -> tuple[torch.Tensor, torch.Tensor, Telemetry]:
        """(M [..., 2, 2] (see `aligned_matrix`), damping applied [...], extra telemetry)."""
        raise NotImplementedError
