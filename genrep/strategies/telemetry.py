"""What a strategy did on one step, read off the Gram matrix and its weights alone (no D-sized work).

Per segment s with Gram G_s and weights w_s = [w_p, w_g]:
- cos_s = G_s[0,1]/√(G_s[0,0]·G_s[1,1]), the conflict (cos < 0) and the norm ratio ‖g_p‖/‖g_g‖;
- the update change ‖u − u_ref‖/‖u_ref‖ with u = w_p·g_p + w_g·g_g and u_ref = r_p·g_p + r_g·g_g,
  the plain sum with the strategy's own task weights r (so the weighting alone counts as no
  change): ‖u − u_ref‖² = (w − r)ᵀ G (w − r) and ‖u_ref‖² = rᵀ G r, summed over segments, so it
  is exact and costs O(S) (it says whether a strategy acts at all before outcomes are compared).
The whole-vector values come from the Gram summed over segments. The harness hands over per-tensor
Grams on every arm that takes task gradients (a whole-vector rule's weights broadcast to every
tensor, so the update change is the whole vector's), so the per-tensor values below exist
whatever the strategy's granularity. With ``strategy.scope: attention`` (genrep/strategies/scope.py)
the per-tensor weights are the rule's inside the scope and the task weights outside, so the
update change is still the whole update's; `scope_summary` adds the scope's own values.
"""
from __future__ import annotations

import torch

from .registry import Telemetry, gram_stats

# A task "reaches" a segment when its gradient there exceeds this share of its whole norm. A
# gradient that is 0 in exact arithmetic is not 0 in floats: an attention key bias (softmax is
# invariant to it) showed ‖g_p‖ at 6.7e-10 of the whole perception gradient on the tiny UNet,
# with a cos that is round-off noise and moved the median of 61 tensors by 8e-4 between 1 and 2
# workers; the smallest real tensor was at 4.5e-3, the norm ratios of real tensors are 1e-3..1e3.
REACH = 1e-6


def quad(gram: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """vᵀ G v per segment for gram [S, 2, 2] and v [S, 2]."""
    return torch.einsum("si,sij,sj->s", v, gram, v)


def update_change(gram: torch.Tensor, w: torch.Tensor, ref=(1.0, 1.0)) -> torch.Tensor:
    """‖u − u_ref‖/‖u_ref‖ over all segments: √(Σ_s (w_s−r)ᵀG_s(w_s−r) / Σ_s rᵀG_s r)."""
    gram, w = gram.reshape(-1, 2, 2), w.reshape(-1, 2).to(gram)
    r = torch.as_tensor(ref, dtype=gram.dtype, device=gram.device).expand_as(w)
    num = quad(gram, w - r).sum().clamp_min(0)
    den = quad(gram, r).sum()
    return (num / den.clamp_min(torch.finfo(gram.dtype).tiny)).sqrt()


def summarize(gram: torch.Tensor, w: torch.Tensor, tel: Telemetry, ref=(1.0, 1.0)) -> dict[str, float]:
    """Scalars to log for one step: whole-vector cos and norms (the segments' Grams summed), the
    update change, per-segment cos quantiles, the share of segments in conflict and the median
    norm ratio ‖g_p‖/‖g_g‖ (over the segments both tasks reach: ‖g_i,s‖ > REACH·‖g_i‖ for both;
    ``seg_shared`` is their share of all segments), and the strategy's own
    per-segment values (damping, weights) averaged over segments."""
    gram = gram.reshape(-1, 2, 2)
    whole = gram_stats(gram.sum(0))
    per = gram_stats(gram)
    out = {"cos": float(whole.cos), "norm_p": float(whole.norm_p), "norm_g": float(whole.norm_g),
           "norm_ratio": float(whole.norm_p / whole.norm_g.clamp_min(1e-30)),
           "update_change": float(update_change(gram, w, ref))}
    if gram.shape[0] > 1:  # per-tensor telemetry: only segments both tasks reach count
        both = (per.norm_p > REACH * whole.norm_p) & (per.norm_g > REACH * whole.norm_g)
        cos = per.cos[both].float()
        if cos.numel():
            q = torch.quantile(cos, torch.tensor([0.1, 0.5, 0.9], dtype=cos.dtype))
            ratio = (per.norm_p[both] / per.norm_g[both]).double()
            out |= {"seg_cos_p10": float(q[0]), "seg_cos_median": float(q[1]),
                    "seg_cos_p90": float(q[2]), "seg_conflict": float((cos < 0).float().mean()),
                    "seg_shared": float(both.float().mean()),
                    "seg_norm_ratio_median": float(torch.quantile(ratio, 0.5))}
    for key in ("conflict", "damping", "w_p", "w_g"):
        if key in tel and torch.is_tensor(tel[key]):
            out[key] = float(tel[key].double().mean())
    return out


def scope_summary(gram: torch.Tensor, w: torch.Tensor, in_scope: torch.Tensor, ref=(1.0, 1.0)) -> dict[str, float]:
    """The scope's own values for per-tensor Grams [T, 2, 2], weights [T, 2] and in_scope [T]:
    ``scope_cos``, cos(g_p, g_g) on the in-scope tensors together (their Grams summed);
    ``scope_update_change``, ‖u − u_ref‖/‖u_ref‖ over them alone (outside the scope w = r, so the
    whole-update change is this one scaled by ‖u_ref,scope‖/‖u_ref‖); ``scope_tensors``, their
    share of the tensors."""
    gram, w = gram.reshape(-1, 2, 2)[in_scope], w.reshape(-1, 2)[in_scope]
    return {"scope_cos": float(gram_stats(gram.sum(0)).cos),
            "scope_update_change": float(update_change(gram, w, ref)),
            "scope_tensors": float(in_scope.float().mean())}
