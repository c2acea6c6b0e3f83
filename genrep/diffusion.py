"""The forward (noising) process shared by the generation loss and the Monte Carlo posterior.

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models"
(https://arxiv.org/abs/2006.11239): ᾱ_t = Π_{s≤t} (1 − β_s), x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers import DDPMScheduler


def make_scheduler(
    num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"
) -> DDPMScheduler:
    """The one place the noise schedule is built; `.alphas_cumprod` is ᾱ_t, a Tensor[T].

    squaredcos_cap_v2 is the cosine schedule of Nichol & Dhariwal 2021 (arXiv:2102.09672).
    """
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


def rng_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Device to draw on: a generator can only fill tensors on its own device."""
    return generator.device if generator is not None else torch.device(fallback)


def randn(shape, generator=None, device="cpu") -> torch.Tensor:
    """ε ~ N(0, I) of `shape`, drawn on the generator's device, returned on `device`."""
    return torch.randn(shape, generator=generator, device=rng_device(generator, device)).to(device)


def expand_like(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] reshaped to broadcast against x (t indexes x's leading dims)."""
    a_t = a.to(device=t.device)[t].float()
    return a_t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε  (Ho et al. 2020, eq. 4); t: Long[...] over x0's leading dims."""
    ac = expand_like(alphas_cumprod, t.to(x0.device), x0)
    return (ac.sqrt() * x0 + (1.0 - ac).sqrt() * noise).to(x0.dtype)


def drop_labels(
    labels: torch.Tensor, p_uncond: float, null_class: int, generator=None
) -> torch.Tensor:
    """c̃ = ∅ with probability p_uncond, else y: label dropout for classifier-free guidance
    (Ho & Salimans 2022, arXiv:2207.12598)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    device = labels.device
    u = torch.rand(labels.shape, generator=generator, device=rng_device(generator, device))
    drop = u.to(device) < p_uncond  # u ∈ [0, 1): p=0 drops none, p=1 drops all
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class DenoisingDraws(NamedTuple):
    """The randomness of one generation-loss evaluation, one row per image."""

    t: torch.Tensor  # Long[n], t ~ U{0, …, T−1}
    noise: torch.Tensor  # [n, *shape], ε ~ N(0, I)
    drop: torch.Tensor  # Bool[n], True: the label is replaced by ∅ (probability p_uncond)

    def rows(self, index, device=None) -> "DenoisingDraws":
        """The draws of some rows (a data-parallel rank's slice), moved to ``device``."""
        return DenoisingDraws(*(v[index].to(device or v.device) for v in self))


def draw_denoising(n: int, shape, num_timesteps: int, p_uncond: float,
                   generator: torch.Generator | None = None, device="cpu") -> DenoisingDraws:
    """t ~ U{0..T−1}, ε ~ N(0, I), drop ~ Bernoulli(p_uncond) for n images, drawn in this order.

    Drawn for a *global* batch from one generator, every data-parallel rank draws the same numbers
    and takes its rows: W ranks then train on exactly what one rank on the whole batch would.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    on = rng_device(generator, device)
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=on)
    noise = torch.randn((n, *shape), generator=generator, device=on)
    drop = torch.rand(n, generator=generator, device=on) < p_uncond  # u ∈ [0, 1): p=0 drops none
    return DenoisingDraws(t.to(device), noise.to(device), drop.to(device))


def condition(labels: torch.Tensor, drop: torch.Tensor, null_class: int) -> torch.Tensor:
    """c̃ = ∅ where dropped or unlabelled (y < 0), else y (label dropout for classifier-free
    guidance, Ho & Salimans 2022): an image without a label (data.labelled_fraction < 1) trains
    the unconditional model, as a dropped label does."""
    null = drop.to(labels.device) | (labels < 0)
    return torch.where(null, torch.full_like(labels, null_class), labels)
