"""Semantic-driven generation (issues 21, 30): the perception branch's feature map steers denoising.

From public summaries of the GenRep paper (its code is not public; docs/method.md, "Semantic-driven
generation"): the perception branch gives a semantic embedding x_sem that shifts the reverse
process's mean and scales its standard deviation,

    μ_θ(x_t, t, x_sem) = μ_base(x_t, t) + W·concat(x_t, x_sem),   σ_θ(t, x_sem) = σ_base(t)·(1 + f_σ(x_sem)),

and a representation-alignment loss (REPA, Yu et al. 2024) pulls a projection of the denoiser's
own features towards x_sem. Our readings (issue 30, "a module that can steer"):
- x_sem is the perception branch's *feature map* [B, F, h, w] (the layer the classification head
  pools), not the pooled vector: a pooled x_sem through a 1×1 conv on [x_t, x_sem] is a per-image
  constant per channel plus a pixelwise-linear function of x_t, which cannot place anything.
- The mean correction Δε is a small conv net on [x_t, x_sem projected and resized to x_t's grid],
  told t; its output layer is zero-initialised, so a fresh module is "off" bitwise.
- f_σ reads the pooled x_sem and t, and learns from the bound's variance term normalised per t
  (``kl_scale``), so its gradient does not come from t ≥ 990 alone.
- L_rep is REPA's per-position loss, between the denoiser's feature map and x_sem's.
- In training x_sem is read off what sampling can read (``semantic_input``: x̂_0 or x_t), not
  off the clean x_0, a function of the target (kept as the ablation ``"x0"``).

Notation (Ho et al. 2020): ᾱ_t = Π_{s≤t} α_s, β_t = 1 − α_t = 1 − ᾱ_t/ᾱ_{t−1}, ᾱ_{−1} = 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from genrep.diffusion import DenoisingDraws, condition, q_sample

if TYPE_CHECKING:  # genrep.model imports this module
    from genrep.model import GenRepModel

# semantic(x_t, t Long[N], guided ε) -> (Δε like x_t, σ factor [N]): what ``ddim_sample`` calls
SemanticFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# x ↦ x_sem [B, F, h, w]: the semantic network's feature map of the images it is given
SemanticMap = Callable[[torch.Tensor], torch.Tensor]
SOURCES = ("x0_hat", "x_t")  # what x_sem may be read off while sampling
TRAIN_SOURCES = (*SOURCES, "x0")  # and in training: the clean x_0 is the ablation
VLB_WEIGHTINGS = ("per_t", "bound")
TIME_DIM = 32  # sinusoidal features of t that f_σ and the mean correction read


def time_features(t: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """e(t) = [cos(t·ω_k), sin(t·ω_k)]_{k < dim/2}, ω_k = 10000^{−2k/dim}: the sinusoidal timestep
    embedding (Vaswani et al. 2017, §3.5, as DDPM's, Ho et al. 2020); [N, dim], float32."""
    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def _resize(f: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of [B, C, h, w] to ``size`` (identity when it already has it)."""
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    return F.interpolate(f, size=tuple(size), mode="bilinear", align_corners=False)


def tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, F, h, w] → [B, h·w, F]: one row per position, row-major."""
    return feature_map.flatten(2).transpose(1, 2)


class SemanticModulation(nn.Module):
    """Δε(x_t, t, x_sem), the σ factor 1 + f_σ(x_sem, t), and the REPA projector h_φ.

    Shared parameters (``GenRepModel.shared_parameters``): they take the generation gradient, and
    the gradient-alignment strategies see them. The correction's output conv and f_σ's last layer
    are zero-initialised (a zero convolution, as ControlNet's, Zhang et al. 2023), so a fresh
    module leaves the base model's ε and σ exactly unchanged; the layers before them get gradient
    once those have moved.
    """

    def __init__(self, channels: int, feature_dim: int, hidden: int, width: int):
        super().__init__()
        self.sem_proj = nn.Conv2d(feature_dim, width, kernel_size=1)  # P: x_sem's F channels → width
        self.mean_in = nn.Conv2d(channels + width, width, kernel_size=3, padding=1)
        self.mean_time = nn.Linear(TIME_DIM, width)
        self.mean_out = nn.Conv2d(width, channels, kernel_size=3, padding=1)
        self.sigma = nn.Sequential(nn.Linear(feature_dim + TIME_DIM, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(),
                                       nn.Linear(hidden, feature_dim))
        for p in (self.mean_out.weight, self.mean_out.bias, self.sigma[2].weight, self.sigma[2].bias):
            nn.init.zeros_(p)

    def delta_eps(self, x_t: torch.Tensor, t: torch.Tensor, x_sem: torch.Tensor) -> torch.Tensor:
        """Δε = W_2 ⋆ SiLU(W_1 ⋆ concat(x_t, up(P·x_sem)) + U·e(t)), ⋆ a 3×3 conv, P a 1×1 conv, up
        bilinear to x_t's H×W (GenRep's mean correction W·concat(x_t, x_sem), made spatial).

        P and up commute (both linear, the bilinear weights sum to 1), so projecting first is exact
        and cheaper on the coarse grid. A correction of ε is a correction of μ: μ = (x_t −
        β_t/√(1−ᾱ_t)·ε)/√α_t (Ho et al. 2020, eq. 11) is affine in ε, so Δμ = −β_t/(√α_t·√(1−ᾱ_t))·Δε;
        the net sees t, so it may learn that scale, and learning Δε by the ε-MSE is learning Δμ by
        the bound's mean term up to the usual time weighting.
        """
        dtype = self.mean_out.weight.dtype  # the sampler's float32 x_t against a bf16 module
        sem = _resize(self.sem_proj(x_sem.to(dtype)), x_t.shape[-2:])
        h = self.mean_in(torch.cat([x_t.to(dtype), sem], dim=1))
        h = h + self.mean_time(time_features(t).to(dtype))[:, :, None, None]
        return self.mean_out(F.silu(h))

    def sigma_factor(self, x_sem: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """1 + f_σ(x_sem, t) ∈ (0, 2), f_σ = tanh(z), z = w₂·SiLU(W₁·concat(mean_hw x_sem, e(t)) + b₁)
        + b₂ (GenRep's σ scale, told t); [B].

        Computed as 2·sigmoid(2z), the same function (1 + tanh z = 2/(1 + e^{−2z})) without the
        cancellation of 1 + tanh z near −1: in float32 1 + tanh z is exactly 0 from z ≈ −9, and
        a factor of 0 makes the variance KL infinite. Exactly 1 at z = 0, so at init.
        """
        dtype = self.sigma[0].weight.dtype
        pooled = x_sem.to(dtype).mean(dim=(2, 3))
        z = self.sigma(torch.cat([pooled, time_features(t).to(dtype)], dim=-1)).squeeze(-1)
        return 2.0 * torch.sigmoid(2.0 * z)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h_φ(h_n) = W₂·SiLU(W₁h_n + b₁) + b₂ at every position n of the map h [B, F, h, w], F →
        hidden → F (REPA's projector, Yu et al. 2024); [B, h·w, F]."""
        return self.projector(tokens(h))


def _alpha_bars(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t−1}) as float Tensors shaped like t, with ᾱ_{−1} = 1."""
    ac = alphas_cumprod.to(t.device).float()
    a_t = ac[t]
    return a_t, torch.where(t > 0, ac[(t - 1).clamp(min=0)], torch.ones_like(a_t))


def _like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """v [B] reshaped to broadcast against x [B, ...]."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def posterior_variance(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """β̃_t = β_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t) (Ho et al. 2020, eq. 7); ᾱ_{−1} = 1, so β̃_0 = 0."""
    a_t, a_prev = _alpha_bars(alphas_cumprod, t)
    return (1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t)


def posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """μ̃_t = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x_0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t (Ho et al. 2020, eq. 7)."""
    a_t, a_prev = _alpha_bars(alphas_cumprod, t)
    beta, alpha = 1 - a_t / a_prev, a_t / a_prev
    c0 = a_prev.sqrt() * beta / (1 - a_t)
    ct = alpha.sqrt() * (1 - a_prev) / (1 - a_t)
    return _like(c0, x0) * x0.float() + _like(ct, x_t) * x_t.float()


def model_mean(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """μ_θ = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t (Ho et al. 2020, eq. 11)."""
    a_t, a_prev = _alpha_bars(alphas_cumprod, t)
    beta, alpha = 1 - a_t / a_prev, a_t / a_prev
    return (x_t.float() - _like(beta / (1 - a_t).sqrt(), x_t) * eps.float()) / _like(alpha.sqrt(), x_t)


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t (Ho et al. 2020, eq. 15; DDIM's "predicted x_0", eq. 12)."""
    a_t = _like(alphas_cumprod.to(t.device).float()[t], x_t)
    return (x_t.float() - (1 - a_t).sqrt() * eps.float()) / a_t.sqrt()


def semantic_input(source: str, x0: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the semantic network reads: x̂_0 = clip((x_t − √(1−ᾱ_t)·sg(ε))/√ᾱ_t, −1, 1) of the base
    ε (``"x0_hat"``: a clean-looking image, as perception reads), x_t itself (``"x_t"``), or the
    clean x_0 (``"x0"``: training only, a function of the target: the ablation). Like x_t's dtype."""
    if source == "x0_hat":
        return predict_x0(x_t, t, eps.detach(), alphas_cumprod).clamp(-1.0, 1.0).to(x_t.dtype)
    if source == "x_t":
        return x_t
    if source == "x0" and x0 is not None:
        return x0
    raise ValueError(f"unknown semantic source {source!r} (or x0 without the clean image); "
                     f"known: {', '.join(TRAIN_SOURCES)}")


def kl_scale(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w_t = β_t/(α_t·(1 − ᾱ_{t−1})), the bound's weight of the mean error in noise units:
    ‖μ̃_t − μ_θ‖²/β̃_t = w_t·‖ε − ε_θ‖² (Ho et al. 2020, eqs. 7, 11, 12); 1 at t = 0 (no term).

    On the cosine schedule w_999 = 999 (β capped at 0.999), w_998 = 3, median 0.009. Computed in
    float64: β_t = 1 − ᾱ_t/ᾱ_{t−1} loses ~0.1% to float32 rounding at small t. [len(t)], float32.
    """
    ac = alphas_cumprod.to(t.device).double()
    a_t = ac[t]
    a_prev = torch.where(t > 0, ac[(t - 1).clamp(min=0)], torch.ones_like(a_t))
    alpha = a_t / a_prev
    w = (1 - alpha) / (alpha * (1 - a_prev))
    return torch.where(t > 0, w, torch.ones_like(w)).float()


def variance_kl(x0, x_t, t, eps, sigma_factor, alphas_cumprod) -> torch.Tensor:
    """(1/D)·KL(q(x_{t−1}|x_t, x_0) ‖ N(sg(μ_θ), σ_θ²I)) per image, σ_θ² = β̃_t·factor² (Nichol &
    Dhariwal 2021, L_vlb with a stop-gradient on the mean):

        KL/D = mean_d ½[log(σ_θ²/β̃_t) + (β̃_t + (μ̃_t − μ_θ)²)/σ_θ² − 1];   [B]

    Rows with t = 0 give 0: β̃_0 = 0, and the bound's t = 0 term is the decoder's
    −log p(x_0|x_1), which we leave out. Gradient reaches ``sigma_factor`` only (ε is detached).
    The pixel-space form, kept as the reference: the loss uses ``variance_loss``, the same KL in
    noise units (no cancellation of μ̃_t − μ_θ in float32 at small t).
    The factor is floored at 1e-6 against float underflow only (the 1/factor² term keeps it far
    above that; below it the gradient would stop).
    """
    mu_q = posterior_mean(x0, x_t, t, alphas_cumprod)
    mu_p = model_mean(x_t, eps.detach(), t, alphas_cumprod)
    keep = t > 0
    var_q = torch.where(keep, posterior_variance(alphas_cumprod, t), torch.ones_like(t, dtype=torch.float))
    f2 = sigma_factor.float().clamp(min=1e-6) ** 2  # σ_θ²/β̃_t, so finite whatever β̃_t is
    per_dim = 0.5 * (f2.log()[:, None] - 1
                     + (1 + (mu_q - mu_p).flatten(1) ** 2 / var_q[:, None]) / f2[:, None])
    return torch.where(keep, per_dim.mean(dim=1), torch.zeros_like(f2))


def variance_loss(noise, eps, t, sigma_factor, alphas_cumprod, weighting: str = "per_t") -> torch.Tensor:
    """L_vlb per image, ``variance_kl`` in noise units: with f = σ_θ/√β̃_t (``sigma_factor``),
    r = mean_d (ε − sg(ε_θ))² and x_t = q_sample(x_0, t, ε), so ‖μ̃_t − μ_θ‖²/β̃_t = w_t·‖ε − ε_θ‖²
    (``kl_scale``),

        "bound":  KL_t/D       = ½[log f² + 1/f² − 1 + w_t·r/f²]   (Improved DDPM's weighting)
        "per_t":  KL_t/(D·w_t) = ½[(log f² + 1/f² − 1)/w_t + r/f²]   (ours, the default)

    [B], 0 where t = 0. Dividing by w_t, a positive constant per t, leaves each t's minimiser
    f² = 1 + w_t·r as it is and changes only how hard each t pulls on the shared f_σ: at f = 1
    each t's gradient in f is −r, where the bound's is −w_t·r (w_999 = 999 against a median of
    0.009: ~98% of it from t ≥ 990). Chosen over Improved DDPM's importance sampling of t
    (p_t ∝ √E[L_t²], Nichol & Dhariwal 2021, §3.3): that keeps the bound's expected gradient,
    dominated by t = 999, and only lowers its variance; and it would need t drawn apart from the
    ε-MSE's. The noise form also avoids ``variance_kl``'s float32 cancellation of μ̃ − μ_θ at
    small t (a few % there, where ``"per_t"`` gives those t full weight).
    """
    if weighting not in VLB_WEIGHTINGS:
        raise ValueError(f"unknown variance-term weighting {weighting!r}; known: {', '.join(VLB_WEIGHTINGS)}")
    r = (noise.float() - eps.detach().float()).flatten(1).pow(2).mean(dim=1)
    w = kl_scale(alphas_cumprod, t.to(r.device))
    f2 = sigma_factor.float().clamp(min=1e-6) ** 2  # floored against underflow only, as variance_kl
    reg = f2.log() + 1 / f2 - 1  # ≥ 0, and 0 at f = 1
    loss = 0.5 * (reg + w * r / f2) if weighting == "bound" else 0.5 * (reg / w + r / f2)
    return torch.where(t.to(r.device) > 0, loss, torch.zeros_like(loss))


def rep_align_loss(h_proj: torch.Tensor, x_sem: torch.Tensor) -> torch.Tensor:
    """L_rep = 1 − mean_{b,n} cos(h_φ(h_{b,n}), sg(x_sem_{b,n})) over images b and positions n
    (REPA, Yu et al. 2024, eq. 5: per patch); cosines over the last dim, [..., F] both."""
    return 1 - F.cosine_similarity(h_proj.float(), x_sem.detach().float(), dim=-1).mean()


def semantic_generation_loss(model: GenRepModel, x0, labels, draws: DenoisingDraws, alphas_cumprod,
                             null_class: int, semantic: SemanticMap | None, *, source: str = "x0_hat",
                             vlb_weight: float = 1e-3, rep_weight: float = 0.5, modulate: bool = True,
                             vlb_weighting: str = "per_t"):
    """L = mean‖ε − (ε_θ(x_t, t, c̃) + Δε(x_t, t, x_sem))‖² + λ_vlb·mean_b L_vlb,b + λ_rep·L_rep.

    Draws as ``genrep.losses.generation_loss`` (c̃ = ∅ where dropped, x_t = q_sample(x_0, t, ε));
    one forward (``model.eps_and_feature_map``) gives ε and the denoiser's feature map h for L_rep
    (``rep_align_loss`` per position). x_sem = sg(semantic(``semantic_input(source, …)``)), the
    semantic network's map of x̂_0 (from this forward's base ε, detached), of x_t, or of x_0: read
    the way sampling reads it (``semantic_step_fn``), except for the ablation ``"x0"``. L_rep
    aligns with that same x_sem ("between the denoiser's features and x_sem"; with ``"x0"`` it is
    REPA's clean-image target). L_vlb = ``variance_loss`` (``vlb_weighting``). The variance term
    and Δε need ``modulate``, L_rep ``rep_weight`` > 0; with neither the loss is bitwise
    ``generation_loss``'s and ``semantic`` may be None. Metrics (detached): ``loss_gen`` (the MSE),
    ``loss_vlb`` and ``loss_rep`` (0 when off), ``sigma_factor`` (mean; 1 when off).
    """
    if (modulate or rep_weight > 0) and (model.semantic is None or semantic is None):
        raise ValueError("modulate or rep_weight > 0 needs ModelConfig(semantic=True) and a semantic map")
    c_tilde = condition(labels, draws.drop, null_class)
    noise = draws.noise.to(x0.dtype)
    x_t = q_sample(x0, draws.t, noise, alphas_cumprod)
    eps, h = model.eps_and_feature_map(x_t, draws.t, c_tilde)
    x_sem = None
    if modulate or rep_weight > 0:
        with torch.no_grad():
            x_sem = semantic(semantic_input(source, x0, x_t, draws.t, eps, alphas_cumprod)).detach()
    if modulate:
        eps = eps + model.semantic.delta_eps(x_t, draws.t, x_sem)
    loss = loss_gen = F.mse_loss(eps.float(), noise.float())
    vlb, rep, factor = loss.new_zeros(()), loss.new_zeros(()), loss.new_ones(())
    if modulate:
        factor = model.semantic.sigma_factor(x_sem, draws.t)
        vlb = variance_loss(noise, eps, draws.t, factor, alphas_cumprod, vlb_weighting).mean()
        loss = loss + vlb_weight * vlb
    if rep_weight > 0:
        rep = rep_align_loss(model.semantic.project(h), tokens(x_sem))
        loss = loss + rep_weight * rep
    return loss, {"loss_gen": loss_gen.detach(), "loss_vlb": vlb.detach(), "loss_rep": rep.detach(),
                  "sigma_factor": factor.detach().float().mean()}


def semantic_step_fn(model: GenRepModel, sem_model: GenRepModel, source: str,
                     alphas_cumprod: torch.Tensor) -> SemanticFn:
    """The sampler's ``semantic(x_t, t, ε) -> (Δε, factor [N])`` for ``ddim_sample``.

    x_sem = sem_model.semantic_map(``semantic_input(source, …)``): of x̂_0 from the (guided) base ε
    (``"x0_hat"``) or of x_t (``"x_t"``); then Δε = model.semantic.delta_eps(x_t, t, x_sem) and
    factor = model.semantic.sigma_factor(x_sem, t). Cost: one encoder-half forward of ``sem_model``
    per sample and step (N, not 2N: x_sem does not depend on the class).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown semantic source {source!r} for sampling; known: {', '.join(SOURCES)}")
    if model.semantic is None:
        raise ValueError("semantic sampling needs ModelConfig(semantic=True)")
    dtype = next(sem_model.parameters()).dtype

    def semantic(x_t, t, eps):
        x_sem = sem_model.semantic_map(semantic_input(source, None, x_t, t, eps, alphas_cumprod).to(dtype))
        return model.semantic.delta_eps(x_t, t, x_sem), model.semantic.sigma_factor(x_sem, t)

    return semantic


def semantic_eps_fn(model: GenRepModel, sem_model: GenRepModel, source: str, alphas_cumprod: torch.Tensor):
    """ε_θ(x_t, t, c) + Δε(x_t, t, x_sem), x_sem read as the sampler reads it (``semantic_step_fn``):
    an ε function (x_t, t, c) -> ε, inputs cast to the model's dtype, float32 out (held-out loss)."""
    step, dtype = semantic_step_fn(model, sem_model, source, alphas_cumprod), next(model.parameters()).dtype

    def eps(x_t, t, c):
        x_t = x_t.to(dtype)
        base = model.eps(x_t, t, c)
        return (base + step(x_t, t, base)[0]).float()

    return eps


__all__ = ["SemanticModulation", "SemanticFn", "SemanticMap", "SOURCES", "TRAIN_SOURCES", "VLB_WEIGHTINGS",
           "time_features", "tokens", "posterior_variance", "posterior_mean", "model_mean", "predict_x0",
           "semantic_input", "kl_scale", "variance_kl", "variance_loss", "rep_align_loss",
           "semantic_generation_loss", "semantic_step_fn", "semantic_eps_fn"]
