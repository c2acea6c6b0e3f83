"""Where a rule acts: ``strategy.scope`` is "all" (every shared tensor, the default) or "attention".

GenRep aligns the gradients on the attention blocks, and the rest of the shared weights take the
weighted sum (public summaries of Li et al. 2026, ICLR, https://openreview.net/forum?id=yKC3CaFg8K;
docs/method.md, "Where"). With scope "attention" a rule's segments are the in-scope tensors only,
all of them together at granularity "vector", each its own at "tensor"; every other tensor takes
u_i = w_p·g_p,i + w_g·g_g,i with the strategy's task weights, which is what `sum` gives (M = I).
Which tensors are in scope is the model's business (``GenRepModel.attention_mask``: the
parameters of diffusers' ``Attention`` modules). A segment's Gram is the sum of its tensors'
Grams (Grams add over disjoint coordinates), so the rule needs only the per-tensor Grams the
harness already all-reduces, and stays exact under data parallelism. A rule that takes no task
gradients (`sum`) is the weighted sum everywhere, so scope changes nothing for it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .registry import Strategy, Telemetry

SCOPES = ("all", "attention")


@dataclass(frozen=True)
class Scope:
    """The rule's segment of each of T tensors, ``group`` [T] (long; −1: outside the scope, summed),
    and the number S of the rule's segments."""

    group: torch.Tensor
    num: int

    @classmethod
    def of(cls, in_scope: Sequence[bool] | torch.Tensor, granularity: str, device=None) -> Scope:
        """group(i) = 0 for every in-scope tensor at granularity "vector" (one segment), its rank
        among the in-scope tensors at "tensor" (one segment each), −1 outside the scope."""
        mask = torch.as_tensor(in_scope, dtype=torch.bool, device=device)
        if not bool(mask.any()):
            raise ValueError("scope: no tensor is in scope")
        if granularity == "vector":
            return cls(torch.where(mask, 0, -1), 1)
        if granularity == "tensor":
            return cls(torch.where(mask, mask.long().cumsum(0) - 1, -1), int(mask.sum()))
        raise ValueError(f"scope: unknown granularity {granularity!r}; known: vector, tensor")

    @property
    def mask(self) -> torch.Tensor:
        """[T] bool: the tensors the rule acts on."""
        return self.group >= 0

    def grams(self, per_tensor: torch.Tensor) -> torch.Tensor:
        """G_s = Σ_{i: group(i)=s} G_i [S, 2, 2] from the per-tensor Grams [T, 2, 2]."""
        m = self.mask
        return per_tensor.new_zeros(self.num, 2, 2).index_add_(0, self.group[m], per_tensor[m])

    def tensor_weights(self, w: torch.Tensor, task_weights: tuple[float, float]) -> torch.Tensor:
        """w_i [T, 2] = w[group(i)] in scope, (w_p, w_g) = task_weights (the weighted sum) outside."""
        rest = torch.tensor(task_weights, dtype=w.dtype, device=w.device).expand(len(self.group), 2)
        return torch.where(self.mask[:, None], w.reshape(-1, 2)[self.group.clamp_min(0)], rest)


def scoped_weights(strategy: Strategy, per_tensor: torch.Tensor, scope: Scope, state,
                   opts: dict) -> tuple[torch.Tensor, Telemetry]:
    """(w [T, 2] per tensor, the rule's telemetry on its S segments): the rule on the scope's
    segment Grams, the task-weighted sum on every tensor outside it (``opts`` resolved by
    ``strategy.check_options``)."""
    w, tel = strategy.resolved_weights(scope.grams(per_tensor), state, opts)
    return scope.tensor_weights(w, opts["task_weights"]), tel
