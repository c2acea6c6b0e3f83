"""What a strategy did on one step, read off the Gram matrix and its weights alone (no D-sized work).

Per segment s with Gram G_s and weights w_s = [w_p, w_g]:
- cos_s = G_s[0,1]/√(G_s[0,0]·G_s[1,1]), the conflict (cos < 0) and the norm ratio ‖g_p‖/‖g_g‖;
- the update change ‖u − u_ref‖/‖u_ref‖ with u = w_p·g_p + w_g·g_g and u_ref = r_p·g_p + r_g·g_g,
  the plain sum with the strategy's own task weights r (so the weighting alone counts as no
  change): ‖u − u_ref‖² = (w − r)ᵀ G (w − r) and ‖u_ref‖² = rᵀ G r, summed over segments, so it
  is exact and costs O(S) (it says whether a strategy acts at all before outcomes are compared).
The whole-vector values come from the Gram summed over segments.
"""
from __future__ import annotations

import torch

from .registry import Telemetry, gram_stats


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
    update change, per-segment cos quantiles and the share of segments in conflict, and the
    strategy's own per-segment values (damping, weights) averaged over segments."""
    gram = gram.reshape(-1, 2, 2)
    whole = gram_stats(gram.sum(0))
    per = gram_stats(gram)
    out = {"cos": float(whole.cos), "norm_p": float(whole.norm_p), "norm_g": float(whole.norm_g),
           "norm_ratio": float(whole.norm_p / whole.norm_g.clamp_min(1e-30)),
           "update_change": float(update_change(gram, w, ref))}
    if gram.shape[0] > 1:  # per-tensor telemetry: only segments both tasks reach count
        both = (per.norm_p > 0) & (per.norm_g > 0)
        cos = per.cos[both].float()
        if cos.numel():
            q = torch.quantile(cos, torch.tensor([0.1, 0.5, 0.9], dtype=cos.dtype))
            out |= {"seg_cos_p10": float(q[0]), "seg_cos_median": float(q[1]),
                    "seg_cos_p90": float(q[2]), "seg_conflict": float((cos < 0).float().mean()),
                    "seg_shared": float(both.float().mean())}
    for key in ("conflict", "damping", "w_p", "w_g"):
        if key in tel and torch.is_tensor(tel[key]):
            out[key] = float(tel[key].float().mean())
    return out
