"""Semantic-driven generation (issue 21): the perception branch's embedding modulates denoising.

From public summaries of the GenRep paper (its code is not public; docs/method.md, "Semantic-driven
generation"): the perception branch gives a semantic embedding x_sem that shifts the reverse
process's mean and scales its standard deviation,

    μ_θ(x_t, t, x_sem) = μ_base(x_t, t) + W·concat(x_t, x_sem),   σ_θ(t, x_sem) = σ_base(t)·(1 + f_σ(x_sem)),

and a representation-alignment loss (REPA, Yu et al. 2024) pulls a projection of the denoiser's
own features towards x_sem. Our readings:
- x_sem is the *pooled* perception feature (what the classification head reads, ``[B, F]``),
  broadcast over H×W; the spatial (dense) x_sem is left for later.
- The mean correction is learnt in the ε-parameterisation (``SemanticModulation.delta_eps``); the
  variance factor through the variational bound's variance term with a stop-gradient on the mean
  (Improved DDPM, Nichol & Dhariwal 2021), since the ε-MSE carries no signal about σ.

Notation (Ho et al. 2020): ᾱ_t = Π_{s≤t} α_s, β_t = 1 − α_t = 1 − ᾱ_t/ᾱ_{t−1}, ᾱ_{−1} = 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from genrep.diffusion import DenoisingDraws, condition, q_sample

if TYPE_CHECKING:  # genrep.model imports this module
    from genrep.model import GenRepModel

# semantic(x_t, t Long[N], guided ε) -> (Δε like x_t, σ factor [N]): what ``ddim_sample`` calls
SemanticFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SOURCES = ("x0_hat", "x_t")


class SemanticModulation(nn.Module):
    """Δε(x_t, x_sem), the σ factor 1 + f_σ(x_sem), and the REPA projector h_φ.

    Shared parameters (``GenRepModel.shared_parameters``): they take the generation gradient, and
    the gradient-alignment strategies see them. The correction and f_σ's last layer are
    zero-initialised, so a fresh module leaves the base model's ε and σ exactly unchanged.
    """

    def __init__(self, channels: int, feature_dim: int, hidden: int):
        super().__init__()
        self.mean = nn.Conv2d(channels + feature_dim, channels, kernel_size=1)
        self.sigma = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(),
                                       nn.Linear(hidden, feature_dim))
        for p in (self.mean.weight, self.mean.bias, self.sigma[2].weight, self.sigma[2].bias):
            nn.init.zeros_(p)

    def delta_eps(self, x_t: torch.Tensor, x_sem: torch.Tensor) -> torch.Tensor:
        """Δε = W·concat(x_t, x_sem broadcast to H×W) + b, a 1×1 conv (GenRep's mean correction).

        A correction of ε is a correction of μ: μ = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t (Ho et al. 2020,
        eq. 11) is affine in ε, so Δμ = −β_t/(√α_t·√(1−ᾱ_t))·Δε. Our reading: that time scale is
        absorbed into W (one W for every t), and learning Δε by the ε-MSE is learning Δμ by the
        bound's mean term up to the usual time weighting.
        """
        b, _, h, w = x_t.shape
        dtype = self.mean.weight.dtype  # the sampler's float32 x_t against a bf16 module
        sem = x_sem.to(dtype)[:, :, None, None].expand(b, x_sem.shape[1], h, w)
        return self.mean(torch.cat([x_t.to(dtype), sem], dim=1))

    def sigma_factor(self, x_sem: torch.Tensor) -> torch.Tensor:
        """1 + f_σ(x_sem) ∈ (0, 2), f_σ = tanh(z), z = w₂·SiLU(W₁x_sem + b₁) + b₂ (GenRep's σ scale); [B].

        Computed as 2·sigmoid(2z), the same function (1 + tanh z = 2/(1 + e^{−2z})) without the
        cancellation of 1 + tanh z near −1: in float32 1 + tanh z is exactly 0 from z ≈ −9, and
        a factor of 0 makes the variance KL infinite. Exactly 1 at z = 0, so at init.
        """
        z = self.sigma(x_sem.to(self.sigma[0].weight.dtype)).squeeze(-1)
        return 2.0 * torch.sigmoid(2.0 * z)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h_φ(h) = W₂·SiLU(W₁h + b₁) + b₂, F → hidden → F (REPA's projector, Yu et al. 2024)."""
        return self.projector(h)


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


def variance_kl(x0, x_t, t, eps, sigma_factor, alphas_cumprod) -> torch.Tensor:
    """(1/D)·KL(q(x_{t−1}|x_t, x_0) ‖ N(sg(μ_θ), σ_θ²I)) per image, σ_θ² = β̃_t·factor² (Nichol &
    Dhariwal 2021, L_vlb with a stop-gradient on the mean):

        KL/D = mean_d ½[log(σ_θ²/β̃_t) + (β̃_t + (μ̃_t − μ_θ)²)/σ_θ² − 1];   [B]

    Rows with t = 0 give 0: β̃_0 = 0, and the bound's t = 0 term is the decoder's
    −log p(x_0|x_1), which we leave out. Gradient reaches ``sigma_factor`` only (ε is detached).
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


def rep_align_loss(h_proj: torch.Tensor, x_sem: torch.Tensor) -> torch.Tensor:
    """L_rep = 1 − (1/B)·Σ_b cos(h_φ(h_b), sg(x_sem_b)) (REPA, Yu et al. 2024, eq. 5, pooled over
    tokens: one vector per image)."""
    return 1 - F.cosine_similarity(h_proj.float(), x_sem.detach().float(), dim=-1).mean()


def semantic_generation_loss(model: GenRepModel, x0, labels, draws: DenoisingDraws, alphas_cumprod,
                             null_class: int, x_sem: torch.Tensor | None, *, vlb_weight: float = 1e-3,
                             rep_weight: float = 0.5, modulate: bool = True):
    """L = mean‖ε − (ε_θ(x_t, t, c̃) + Δε(x_t, sg(x_sem)))‖² + λ_vlb·mean_b KL_b/D + λ_rep·L_rep.

    Draws as ``genrep.losses.generation_loss`` (c̃ = ∅ where dropped, x_t = q_sample(x_0, t, ε));
    one forward (``model.eps_and_features``) gives ε and the denoiser's pooled features h for
    L_rep = 1 − mean cos(h_φ(h), x_sem). x_sem is detached (the EMA semantic network's). The KL
    term (``variance_kl``) and Δε need ``modulate``; L_rep needs ``rep_weight`` > 0. With neither,
    the loss is bitwise ``generation_loss``'s and ``x_sem`` may be None. Metrics (detached):
    ``loss_gen`` (the MSE), ``loss_vlb`` and ``loss_rep`` (0 when off), ``sigma_factor`` (mean; 1
    when off).
    """
    if (modulate or rep_weight > 0) and (model.semantic is None or x_sem is None):
        raise ValueError("modulate or rep_weight > 0 needs ModelConfig(semantic=True) and x_sem")
    c_tilde = condition(labels, draws.drop, null_class)
    noise = draws.noise.to(x0.dtype)
    x_t = q_sample(x0, draws.t, noise, alphas_cumprod)
    eps, pooled = model.eps_and_features(x_t, draws.t, c_tilde)
    sem = x_sem.detach() if x_sem is not None else None
    if modulate:
        eps = eps + model.semantic.delta_eps(x_t, sem)
    loss = loss_gen = F.mse_loss(eps.float(), noise.float())
    vlb, rep, factor = loss.new_zeros(()), loss.new_zeros(()), loss.new_ones(())
    if modulate:
        factor = model.semantic.sigma_factor(sem)
        vlb = variance_kl(x0, x_t, draws.t, eps, factor, alphas_cumprod).mean()
        loss = loss + vlb_weight * vlb
    if rep_weight > 0:
        rep = rep_align_loss(model.semantic.project(pooled), sem)
        loss = loss + rep_weight * rep
    return loss, {"loss_gen": loss_gen.detach(), "loss_vlb": vlb.detach(), "loss_rep": rep.detach(),
                  "sigma_factor": factor.detach().float().mean()}


def semantic_step_fn(model: GenRepModel, sem_model: GenRepModel, source: str,
                     alphas_cumprod: torch.Tensor) -> SemanticFn:
    """The sampler's ``semantic(x_t, t, ε) -> (Δε, factor [N])`` for ``ddim_sample``.

    x_sem = sem_model.semantic_features(x̂_0), x̂_0 = clip((x_t − √(1−ᾱ_t)·ε)/√ᾱ_t, −1, 1) from the
    (guided) base ε (``source="x0_hat"``: perception reads a clean-looking image, as in training),
    or of x_t itself (``source="x_t"``). Then Δε = model.semantic.delta_eps(x_t, x_sem) and
    factor = model.semantic.sigma_factor(x_sem). Cost: one encoder-half forward of ``sem_model``
    per sample and step (N, not 2N: x_sem does not depend on the class).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown semantic source {source!r}; known: {', '.join(SOURCES)}")
    if model.semantic is None:
        raise ValueError("semantic sampling needs ModelConfig(semantic=True)")
    dtype = next(sem_model.parameters()).dtype

    def semantic(x_t, t, eps):
        x_in = predict_x0(x_t, t, eps, alphas_cumprod).clamp(-1.0, 1.0) if source == "x0_hat" else x_t
        x_sem = sem_model.semantic_features(x_in.to(dtype))
        return model.semantic.delta_eps(x_t, x_sem), model.semantic.sigma_factor(x_sem)

    return semantic


__all__ = ["SemanticModulation", "SemanticFn", "posterior_variance", "posterior_mean", "model_mean",
           "predict_x0", "variance_kl", "rep_align_loss", "semantic_generation_loss",
           "semantic_step_fn"]
