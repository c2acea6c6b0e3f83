"""Gradient-combination strategies as pure torch functions.

Every rule is per-segment coefficients w = [w_p, w_g] computed from the 2×2 Gram matrix of the
perception and generation gradients, and the shared-parameter gradient is w_p·g_p + w_g·g_g.
A segment is the whole flattened gradient (default) or one parameter tensor (`segment_ids`).
Grams are sums over coordinates, so partial Grams over disjoint shards add up to the full one:
under ZeRO each rank calls `gram_matrix` on its shard, all-reduces [S, 2, 2], calls `weights`,
and `apply_weights` on its shard.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import balanced, genrep, pcgrad, sum, torchjd_rules  # noqa: F401  (registers the strategies)
from .registry import STRATEGIES, Registry, Strategy, Telemetry

__all__ = ["Registry", "Strategy", "STRATEGIES", "available", "get", "weights", "gram_matrix",
           "apply_weights", "combine", "segment_ids"]


def available() -> list[str]:
    """Registered combination rules. `separate` (two models, one per task) is a training mode, not a rule."""
    return STRATEGIES.names()


def get(name: str) -> Strategy:
    return STRATEGIES.get(name)


def weights(name: str, gram: torch.Tensor, state=None, **options) -> tuple[torch.Tensor, Telemetry]:
    """w [..., 2] and per-segment telemetry for gram [..., 2, 2] under strategy `name`."""
    return get(name).weights(gram, state, **options)


def segment_ids(shapes_or_numels: Sequence, device=None) -> torch.Tensor:
    """LongTensor[D] giving each coordinate of the flattened parameters its tensor's index."""
    numels = [n if isinstance(n, int) else math.prod(n) for n in shapes_or_numels]
    ids = torch.arange(len(numels), device=device)
    return ids.repeat_interleave(torch.tensor(numels, device=device))


def _check_grads(grads: torch.Tensor) -> None:
    if grads.ndim != 2 or grads.shape[0] != 2:
        raise ValueError(f"grads must be [2, D] (perception, generation), got {tuple(grads.shape)}")


def gram_matrix(grads: torch.Tensor, segments: torch.Tensor | None = None,
                num_segments: int | None = None) -> torch.Tensor:
    """G[s] = Σ_{i: seg(i)=s} g_i g_iᵀ for grads [2, D] → [S, 2, 2] (S = 1 without segments).

    Pass `num_segments` on a shard: a rank may hold no coordinate of the last segments.
    Sorted ids (contiguous blocks: `segment_ids`, or a slice of them) take one 2×2 matmul per
    block; any other order an index_add over the D coordinates. The blocks cost ~3 ms at D ≈ 1.06M
    in 153 tensors (digits16, one CPU thread) where index_add took ~15 ms, and BLAS sums a block
    more accurately than index_add's one running float per segment.
    """
    _check_grads(grads)
    if segments is None:
        return (grads @ grads.T)[None]
    S = int(segments.max()) + 1 if num_segments is None else num_segments
    if bool((segments[1:] >= segments[:-1]).all()):
        lengths = torch.bincount(segments, minlength=S).tolist()
        return torch.stack([block @ block.T for block in grads.split(lengths, dim=1)])
    g_p, g_g = grads
    products = torch.stack([g_p * g_p, g_p * g_g, g_g * g_g], 1)  # [D, 3]: 3·D memory, not 4·D
    sums = products.new_zeros(S, 3).index_add_(0, segments, products)
    return sums[:, [0, 1, 1, 2]].reshape(S, 2, 2)


def apply_weights(grads: torch.Tensor, w: torch.Tensor, segments: torch.Tensor | None = None,
                  in_place: bool = False) -> torch.Tensor:
    """g_i = w[seg(i), 0]·g_p,i + w[seg(i), 1]·g_g,i for grads [2, D] and w [S, 2].

    ``in_place`` with whole-vector weights writes the result over grads[0]: no D-sized temporary
    (a fresh D-sized tensor costs as much CPU in first-touch page faults as the arithmetic:
    docs/performance.md, P2).
    """
    _check_grads(grads)
    w = w.reshape(-1, 2)
    if in_place and segments is None:
        w_p, w_g = w[0].tolist()
        return grads[0].mul_(w_p).add_(grads[1], alpha=w_g)
    w_i = w[segments].T if segments is not None else w[0][:, None]  # [2, D] or [2, 1]
    return w_i[0] * grads[0] + w_i[1] * grads[1]


def combine(name: str, grads: torch.Tensor, segments: torch.Tensor | None = None, state=None,
            **options) -> tuple[torch.Tensor, Telemetry]:
    """Combined gradient [D] of grads [2, D] under `name`, and telemetry ([S] tensors).

    A stateful rule (genrep, rule="gradvac") returns telemetry["state"]: pass it as `state` next step.
    """
    w, tel = weights(name, gram_matrix(grads, segments), state, **options)
    return apply_weights(grads, w, segments), tel
