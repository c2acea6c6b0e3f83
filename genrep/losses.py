"""Losses of the unified network. Each returns (loss, metrics) with detached metric values."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from genrep.diffusion import drop_labels, q_sample, randn, rng_device

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def denoising_loss(
    eps_fn: EpsFn,
    x0: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    p_uncond: float,
    null_class: int,
    generator: torch.Generator | None = None,
):
    """L_gen = E_{t~U[0,T), ε} ||ε − ε_θ(x_t, t, c̃)||², mean over elements (Ho et al. 2020, eq. 14)."""
    device, num_t = x0.device, alphas_cumprod.shape[0]
    t = torch.randint(0, num_t, (x0.shape[0],), generator=generator,
                      device=rng_device(generator, device)).to(device)
    noise = randn(x0.shape, generator, device).to(x0.dtype)
    c_tilde = drop_labels(labels, p_uncond, null_class, generator)
    return denoising_loss_given(eps_fn, x0, c_tilde, t, noise, alphas_cumprod)


def denoising_loss_given(eps_fn: EpsFn, x0, c_tilde, t, noise, alphas_cumprod):
    """||ε − ε_θ(x_t, t, c̃)||² (mean) for given draws (t, ε, c̃): the data-parallel harness draws
    them for the global batch and passes each rank its slice (Ho et al. 2020, eq. 14)."""
    eps_pred = eps_fn(q_sample(x0, t, noise, alphas_cumprod), t, c_tilde)
    loss = F.mse_loss(eps_pred.float(), noise.float())
    return loss, {"loss_gen": loss.detach()}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """L_ce = −(1/B) Σ_b log softmax(z_b)[y_b]."""
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, {"loss_ce": loss.detach(), "acc": acc.detach()}


def distillation_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, tau: float):
    """L_kd = τ² · (1/B) Σ_b KL(q_b ‖ softmax(z_b/τ)) (Hinton et al. 2015, arXiv:1503.02531).

    τ² keeps the gradient's scale independent of τ. q log q uses xlogy, so classes the teacher
    pruned (q = 0 exactly) contribute 0 instead of NaN.
    """
    q = teacher_probs.detach().float()
    log_p = F.log_softmax(logits.float() / tau, dim=-1)
    kl = (torch.xlogy(q, q) - q * log_p).sum(-1)
    loss = tau**2 * kl.mean()
    agree = (logits.argmax(-1) == q.argmax(-1)).float().mean()
    return loss, {"loss_kd": loss.detach(), "kd_agree": agree.detach()}


def perception_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor | None = None,
    beta: float = 0.0,
    tau: float = 1.0,
    use_ce: bool = True,
):
    """L_perc = L_ce + β·L_kd (either term may be off, not both)."""
    if not use_ce and beta == 0.0:
        raise ValueError("perception_loss needs use_ce=True or beta > 0")
    if beta != 0.0 and teacher_probs is None:
        raise ValueError(f"beta={beta} needs teacher_probs")
    loss, metrics = logits.new_zeros((), dtype=torch.float32), {}
    if use_ce:
        ce, m = cross_entropy(logits, labels)
        loss, metrics = loss + ce, {**metrics, **m}
    if beta != 0.0:
        kd, m = distillation_loss(logits, teacher_probs, tau)
        loss, metrics = loss + beta * kd, {**metrics, **m}
    return loss, {**metrics, "loss_perc": loss.detach()}
