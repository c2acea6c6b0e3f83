"""Class-conditional sampling: DDIM (Song et al. 2021, arXiv:2010.02502) on the training schedule,
with optional classifier-free guidance through the null class (Ho & Salimans 2022, arXiv:2207.12598).

Semantic-driven sampling (issues 21, 30, ``semantic=``): each step's guided ε gets the correction
Δε(x_t, t, x_sem) and, for η > 0, σ_t(η) the factor 1 + f_σ(x_sem, t) (``genrep.semantic``),
stepped by our own ``ddim_step``; without it the diffusers DDIM step runs as before.

Two named samplers (``SAMPLER_ETA``, the evaluation's ``eval.samplers``): ``ddim`` (η = 0,
deterministic given x_T, where the σ factor does nothing) and ``ddpm`` (η = 1: DDPM's ancestral
sampler on the strided chain, the paper's sampler; the σ factor acts).

Determinism: the initial noise x_T (and, for η > 0, every step's noise) is drawn for all N samples
at once from one generator, so a seed gives the same images whatever ``batch_size`` is.
"""
from __future__ import annotations

import io

import torch
from diffusers import DDIMScheduler

from genrep.diffusion import make_scheduler, randn
from genrep.losses import EpsFn
from genrep.semantic import SemanticFn


# η of DDIM's update (Song et al. 2021, eq. 16) for each named sampler. η = 1 gives
# σ² = (1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev), the posterior variance β̃ of the strided chain, and the
# mean √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ²)·ε = μ̃(x̂_0, x_t) of DDPM (Ho et al. 2020, eq. 7) on that chain
# (Song et al. 2021, §4.1; Nichol & Dhariwal 2021, §4 respace DDPM this way), up to the clip of x̂_0
# (DDPM's mean takes x_t and the clipped x̂_0, DDIM's the unclipped ε)
SAMPLER_ETA = {"ddim": 0.0, "ddpm": 1.0}


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """A torch.Generator from a seed (int), or the generator itself, or None (global RNG)."""
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


def make_ddim(steps: int) -> DDIMScheduler:
    """DDIM on the same ᾱ_t as training (``make_scheduler``), with ``steps`` inference steps."""
    scheduler = DDIMScheduler.from_config(make_scheduler().config)
    scheduler.set_timesteps(steps)
    return scheduler


def guided_eps(model_eps: EpsFn, x_t, t, labels, guidance_scale: float, null_class: int):
    """ε = ε_∅ + s·(ε_c − ε_∅) (Ho & Salimans 2022, eq. 6); s = 1 is the plain conditional ε_c.

    For s ≠ 1 the conditional and unconditional halves go through the network in one batched
    forward of [x_t; x_t] with labels [c; ∅]: 2 evaluations per sample.
    """
    if guidance_scale == 1.0:
        return model_eps(x_t, t, labels)
    null = torch.full_like(labels, null_class)
    eps = model_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
    eps_c, eps_u = eps.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def sampling_evals(n: int, steps: int, guidance_scale: float) -> int:
    """Network evaluations (per sample, per forward) that ``ddim_sample`` spends: N·steps·(2 with CFG)."""
    return n * steps * (1 if guidance_scale == 1.0 else 2)


def _full(x: torch.Tensor, t) -> torch.Tensor:
    """Timestep t as a Long[len(x)] on x's device."""
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, alphas_cumprod: torch.Tensor,
              eta: float, noise: torch.Tensor | None, sigma_factor: torch.Tensor | None = None
              ) -> torch.Tensor:
    """x_{t_prev} = √ᾱ_prev·x̂_0 + √max(0, 1 − ᾱ_prev − σ²)·ε + σ·z (Song et al. 2021, eq. 12),

    x̂_0 = clip((x_t − √(1−ᾱ_t)·ε)/√ᾱ_t, −1, 1), σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev))
    (eq. 16) times ``sigma_factor`` [N] when given, ᾱ_prev = 1 for t_prev < 0. The operations are
    diffusers' ``DDIMScheduler.step`` (ε-prediction, clip_sample, set_alpha_to_one, and no ε
    re-derived from the clipped x̂_0: ``use_clipped_model_output=False``), so without a factor it
    gives that step's output. The max(0, ·) matters only for factors > 1.
    """
    a_t = alphas_cumprod[int(t)]
    a_prev = alphas_cumprod[int(t_prev)] if t_prev >= 0 else alphas_cumprod.new_tensor(1.0)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    x0 = ((x_t - b_t ** 0.5 * eps) / a_t ** 0.5).clamp(-1.0, 1.0)
    std = eta * ((b_prev / b_t) * (1 - a_t / a_prev)) ** 0.5
    if sigma_factor is not None:
        std = std * sigma_factor.to(x_t.dtype).reshape(-1, *(1,) * (x_t.dim() - 1))
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2).clamp(min=0) ** 0.5 * eps
    return x_prev + std * noise if eta > 0 else x_prev


def _predict(model_eps: EpsFn, semantic: SemanticFn | None, x, t, labels, guidance_scale, null_class):
    """(ε, σ factor or None) of one chunk: the guided ε, plus Δε(x_t, x_sem) when ``semantic``.

    Δε does not depend on the class, so adding it after guidance is adding it to both CFG halves:
    (ε_∅ + Δε) + s·((ε_c + Δε) − (ε_∅ + Δε)) = ε_∅ + s·(ε_c − ε_∅) + Δε.
    """
    tt = _full(x, t)
    eps = guided_eps(model_eps, x, tt, labels, guidance_scale, null_class)
    if semantic is None:
        return eps, None
    delta, factor = semantic(x, tt, eps)
    return eps + delta, factor


@torch.no_grad()
def ddim_sample(model_eps: EpsFn, labels: torch.Tensor, shape, steps: int = 20,
                guidance_scale: float = 1.0, null_class: int | None = None,
                generator: torch.Generator | int | None = None, eta: float = 0.0,
                batch_size: int = 256, semantic: SemanticFn | None = None) -> torch.Tensor:
    """x_0 ~ p_θ(x_0 | c) by ``steps`` DDIM steps from x_T ~ N(0, I); returns Tensor[N, *shape] in [-1, 1].

    Each step predicts ε (guided when s ≠ 1) in chunks of ``batch_size`` samples and updates all N
    with the diffusers DDIM step (x̂_0 clipped to [-1, 1], as the training schedule's config says).
    ``semantic(x_t, t, ε) -> (Δε, factor [N])`` (``genrep.semantic.semantic_step_fn``): ε ← ε + Δε
    and σ_t(η) ← σ_t(η)·factor, stepped by ``ddim_step`` (the factor acts only for η > 0).
    """
    if guidance_scale != 1.0 and null_class is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs null_class")
    gen, device = as_generator(generator), labels.device
    scheduler = make_ddim(steps)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    x = randn((labels.shape[0], *shape), gen, device)
    for t in scheduler.timesteps:
        out = [_predict(model_eps, semantic, x[i:i + batch_size], t, labels[i:i + batch_size],
                        guidance_scale, null_class) for i in range(0, x.shape[0], batch_size)]
        eps = torch.cat([e for e, _ in out]).float()
        noise = randn(x.shape, gen, device) if eta > 0 else None
        if semantic is None:
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        else:
            factor = torch.cat([f for _, f in out]).float()
            x = ddim_step(x, eps, int(t), int(t) - stride, scheduler.alphas_cumprod, eta, noise, factor)
    return x.clamp(-1.0, 1.0)


def grid_labels(num_classes: int, per_class: int, device="cpu") -> torch.Tensor:
    """[0,…,0, 1,…,1, …]: ``per_class`` copies of each class, class-major (one grid row per class)."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def sample_grid(model_eps: EpsFn, num_classes: int, per_class: int, shape, device="cpu", **kw):
    """``per_class`` DDIM samples of every class: (images [C·per_class, *shape], labels), class-major.

    ``kw`` goes to :func:`ddim_sample` (steps, guidance_scale, null_class, generator, eta, batch_size,
    semantic).
    """
    labels = grid_labels(num_classes, per_class, device)
    return ddim_sample(model_eps, labels, shape, **kw), labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → {0..255}: round((x + 1)/2 · 255)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def tile(images: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, C, H, W] → one [rows·H, cols·W, C] image, row-major (N = rows·cols)."""
    n, c, h, w = images.shape
    if n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows")
    cols = n // rows
    return images.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)


def grid_png(images: torch.Tensor, rows: int) -> bytes:
    """Images in [-1, 1] as the bytes of one PNG grid (rows = classes); the caller writes them."""
    from PIL import Image  # diffusers' own dependency; imported here so genrep's import stays light

    grid = tile(to_uint8(images), rows).numpy()
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["SAMPLER_ETA", "ddim_sample", "ddim_step", "sample_grid", "grid_png", "sampling_evals",
           "guided_eps",
           "grid_labels", "make_ddim"]
