"""Gradient-combination strategies as pure torch functions.

Every rule is per-segment coefficients w = [w_p, w_g] computed from the 2×2 Gram matrix of the
perception and generation gradients, and the shared-parameter gradient is w_p·g_p + w_g·g_g.
A segment is the whole flattened gradient (default) or one parameter tensor (`segment_ids`);
`scope` (genrep/strategies/scope.py) restricts the rule to the attention tensors, the rest summed.
Grams are sums over coordinates, so partial Grams over disjoint shards add up to the full one:
under ZeRO each rank calls `gram_matrix` on its shard, all-reduces [S, 2, 2], calls `weights`,
and `apply_weights` on its shard. Grams are float64 whatever the gradients' dtype (bf16 on GPU:
a Gram rounded to bf16 keeps 3 significant digits, and 1 + cos, α's base, cancels to nothing near
cos = −1); the weights go back to the gradients as Python floats or in the gradients' dtype.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import balanced, genrep, pcgrad, sum, torchjd_rules  # noqa: F401  (registers the strategies)
from .registry import STRATEGIES, Registry, Strategy, Telemetry
from .scope import SCOPES, Scope

__all__ = ["Registry", "Strategy", "STRATEGIES", "SCOPES", "Scope", "available", "get", "weights",
           "gram_matrix", "apply_weights", "combine", "segment_ids"]


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


# coordinates cast to float64 at a time: a [2, 2^16] float64 block is 1 MiB, where a copy of the
# whole [2, D] would be 17 MB at D ≈ 1.06M (digits16). Measured on one CPU thread, digits16
# (median of 15): whole-vector Gram 0.45 ms in float32, 1.35 ms in float64 by these blocks (1.55 ms
# with one D-sized copy); per-tensor Grams 1.2 ms → 2.5 ms (docs/strategies.md, "float64 Grams").
GRAM_CHUNK = 1 << 16


def _gram64(block: torch.Tensor) -> torch.Tensor:
    """Σ_i g_i g_iᵀ [2, 2] for block [2, n], accumulated in float64 (exact products of float32 or
    bf16 values: 24 + 24 bits fit in float64's 53), cast GRAM_CHUNK coordinates at a time."""
    if block.dtype == torch.float64:
        return block @ block.T
    if block.shape[1] <= GRAM_CHUNK:
        c = block.double()
        return c @ c.T
    return torch.stack([_gram64(c) for c in block.split(GRAM_CHUNK, dim=1)]).sum(0)


def is_sorted(segments: torch.Tensor) -> bool:
    """Ids in contiguous runs (``segment_ids``, or a slice of them): the fast, blockwise paths."""
    return bool((segments[1:] >= segments[:-1]).all())


def gram_matrix(grads: torch.Tensor, segments: torch.Tensor | None = None,
                num_segments: int | None = None) -> torch.Tensor:
    """G[s] = Σ_{i: seg(i)=s} g_i g_iᵀ in float64 for grads [2, D] (any float dtype) → [S, 2, 2]
    float64 (S = 1 without segments).

    Pass `num_segments` on a shard: a rank may hold no coordinate of the last segments.
    Sorted ids (contiguous blocks: `segment_ids`, or a slice of them) take one 2×2 matmul per
    block; any other order an index_add over the D coordinates (on a float64 copy of the
    gradients: this path is for tests and tools, not the step). The blocks cost ~3 ms at
    D ≈ 1.06M in 153 tensors (digits16, one CPU thread) where index_add took ~15 ms, and BLAS
    sums a block more accurately than index_add's one running float per segment.
    """
    _check_grads(grads)
    if segments is None:
        return _gram64(grads)[None]
    S = int(segments.max()) + 1 if num_segments is None else num_segments
    if is_sorted(segments):
        lengths = torch.bincount(segments, minlength=S).tolist()
        return torch.stack([_gram64(block) for block in grads.split(lengths, dim=1)])
    g_p, g_g = grads.double()
    products = torch.stack([g_p * g_p, g_p * g_g, g_g * g_g], 1)  # [D, 3]: 3·D memory, not 4·D
    sums = products.new_zeros(S, 3).index_add_(0, segments, products)
    return sums[:, [0, 1, 1, 2]].reshape(S, 2, 2)


def apply_weights(grads: torch.Tensor, w: torch.Tensor, segments: torch.Tensor | None = None,
                  in_place: bool = False) -> torch.Tensor:
    """g_i = w[seg(i), 0]·g_p,i + w[seg(i), 1]·g_g,i for grads [2, D] and w [S, 2]; the result has
    the gradients' dtype (float64 weights are not promoted into a float64 update).

    ``in_place`` writes the result over grads[0], per contiguous block of ``segments`` (or over
    the whole vector) with the weights as Python floats: no D-sized temporary (a fresh D-sized
    tensor costs as much CPU in first-touch page faults as the arithmetic: docs/performance.md,
    P2), and the weights enter bf16 arithmetic at float32 precision rather than rounded to bf16.
    Per tensor on digits16 (153 blocks, one CPU thread) it took 1.5 ms where the gather of
    w[seg] took 10.6 ms. Unsorted ids fall back to the gather.
    """
    _check_grads(grads)
    w = w.reshape(-1, 2)
    if in_place and (segments is None or is_sorted(segments)):
        lengths = ([grads.shape[1]] if segments is None
                   else torch.bincount(segments, minlength=w.shape[0]).tolist())
        if len(lengths) != w.shape[0]:
            raise ValueError(f"segment ids reach {len(lengths) - 1}, weights have {w.shape[0]} rows")
        for (w_p, w_g), p, g in zip(w.tolist(), grads[0].split(lengths), grads[1].split(lengths)):
            if p.numel():
                p.mul_(w_p).add_(g, alpha=w_g)
        return grads[0]
    w = w.to(grads.dtype)
    w_i = w[segments].T if segments is not None else w[0][:, None]  # [2, D] or [2, 1]
    return w_i[0] * grads[0] + w_i[1] * grads[1]


def combine(name: str, grads: torch.Tensor, segments: torch.Tensor | None = None, state=None,
            **options) -> tuple[torch.Tensor, Telemetry]:
    """Combined gradient [D] of grads [2, D] under `name`, and telemetry ([S] tensors).

    A stateful rule (genrep, rule="gradvac") returns telemetry["state"]: pass it as `state` next step.
    """
    w, tel = weights(name, gram_matrix(grads, segments), state, **options)
    return apply_weights(grads, w, segments), tel
