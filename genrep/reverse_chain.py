"""The reverse-chain MCMC estimator of p(x|y): GenRep's second estimator of the teacher (issue 20).

What the paper's public summaries give: the intermediate states of one reverse diffusion chain are
the Monte Carlo samples; the first m are dropped (burn-in, m = 50), every k-th of the rest is kept
(thinning, k = 2), p(x|y) ≈ (1/n) Σ_{kept t} N(x; μ_{t,y}, σ_t) with about 200 reverse steps, and
Bayes with a uniform prior gives p(y|x). Everything more specific here is OUR READING, written out
in :func:`reverse_chain_posterior`. The result is the forward estimator's ``McResult``, with the
same conventions (``errors`` lower is better, ``probs`` = softmax(−errors/τ_mc + log p(c))).

Notation as in genrep.diffusion (Ho et al. 2020, arXiv:2006.11239): x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε;
DDIM steps as in Song et al. 2021 (arXiv:2010.02502, eq. 12 and 16).
"""

from __future__ import annotations

import math

import torch

from genrep.diffusion import q_sample, randn
from genrep.losses import EpsFn
from genrep.posterior import McResult, log_prior, posterior


def chain_timesteps(steps: int, num_timesteps: int, start: int | None = None) -> torch.Tensor:
    """τ_i = round(s·(1 − i/(steps−1))), i = 0..steps−1, s = ``start`` (default T−1): s down to 0,
    evenly spaced, Long[steps].

    A respaced reverse chain, as DDIM respaces (Song et al. 2021, Sec. 4.2); strictly decreasing
    for steps ≤ s + 1 (the spacing s/(steps−1) is then ≥ 1 wherever steps > 1). steps = 1: [s].
    """
    s = num_timesteps - 1 if start is None else start
    if not 0 <= s <= num_timesteps - 1:
        raise ValueError(f"start must be in [0, T−1={num_timesteps - 1}], got {start}")
    if not 1 <= steps <= s + 1:
        raise ValueError(f"steps must be in [1, start+1={s + 1}], got {steps}")
    return torch.linspace(s, 0, steps, dtype=torch.float64).round().long()


def kept_indices(steps: int, burn_in: int, thin: int) -> list[int]:
    """Chain states i kept as samples: i ≥ burn_in and (i − burn_in) % thin == 0.

    State i is x_{τ_i}; state 0 is the image noised to τ_0 = T−1 (nearly pure noise: what burn-in
    drops), state steps−1 the chain's end at τ = 0. n = ⌈(steps − burn_in)/thin⌉ states are kept.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= burn_in < steps:
        raise ValueError(f"burn_in must be in [0, steps={steps}) so that a state is kept, got {burn_in}")
    if thin < 1:
        raise ValueError(f"thin must be >= 1, got {thin}")
    return list(range(burn_in, steps, thin))


def draw_chain_noise(steps: int, batch: int, shape, generator: torch.Generator | None = None,
                     device="cpu") -> torch.Tensor:
    """All the randomness of the chains, Tensor[batch, steps, *shape] ~ N(0, I).

    Row b is image b's: [b, 0] its start noise (x_{τ_0} = q_sample(x0, τ_0, ·)), [b, i] for i ≥ 1
    the ancestral noise of the step τ_{i−1} → τ_i (drawn, and unused, when η = 0, so the layout
    does not depend on η). Drawn for a global batch from one generator, rank r's rows give it
    exactly what one process on the whole batch computes for those images.
    """
    return randn((batch, steps, *shape), generator, device)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t (Ho et al. 2020, eq. 4 solved for x0); not clipped."""
    return (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)


def ddim_step(x_t, eps, a_t: float, a_s: float, eta: float, noise) -> torch.Tensor:
    """x_s = √ᾱ_s x̂0 + √(1−ᾱ_s−σ²) ε̂ + σ z for s < t (Song et al. 2021, eq. 12), with
    σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s) (eq. 16): η = 1 is DDPM-like ancestral noise, η = 0
    deterministic. x̂0 is not clipped (diffusers' sampler clips it to [-1, 1]; a likelihood must
    not move the chain off the model's own prediction)."""
    sigma = eta * math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))
    direction = math.sqrt(max(1.0 - a_s - sigma**2, 0.0))  # max: rounding at η = 1, t → s
    return math.sqrt(a_s) * predict_x0(x_t, eps, a_t) + direction * eps + sigma * noise


def _chunked_eps(eps_fn: EpsFn, x, t, labels, chunk_size: int) -> torch.Tensor:
    """ε_θ(x, t, c) for n inputs, at most ``chunk_size`` per forward, as float32."""
    return torch.cat([eps_fn(x[i:i + chunk_size], t[i:i + chunk_size], labels[i:i + chunk_size]).float()
                      for i in range(0, x.shape[0], chunk_size)])


@torch.no_grad()
def run_chain(eps_fn: EpsFn, x0, timesteps, keep: list[int], alphas_cumprod, null_class: int,
              eta: float, noise, chunk_size: int = 256) -> torch.Tensor:
    """The kept states x_{τ_i}, i ∈ keep, of each image's chain: Tensor[B, n, *shape].

    x_{τ_0} = √ᾱ x0 + √(1−ᾱ) z_0 (the chain is tied to the image), then DDIM steps τ_i → τ_{i+1}
    with ε̂ = ε_θ(x, τ_i, ∅) up to the last kept state (steps after it could not change a kept
    state): B·keep[−1] network evaluations, B·(steps − 1) when the chain's end is kept. The null
    label (the unconditional model) favours no class.
    """
    ac = alphas_cumprod.double().cpu()
    x = q_sample(x0, timesteps[:1].expand(x0.shape[0]).to(x0.device), noise[:, 0].to(x0.dtype),
                 alphas_cumprod).float()
    null = torch.full((x0.shape[0],), null_class, dtype=torch.long, device=x0.device)
    states = [x] if keep[0] == 0 else []
    for i in range(keep[-1]):
        t_i, t_next = int(timesteps[i]), int(timesteps[i + 1])
        eps = _chunked_eps(eps_fn, x.to(x0.dtype), torch.full_like(null, t_i), null, chunk_size)
        x = ddim_step(x, eps, ac[t_i].item(), ac[t_next].item(), eta, noise[:, i + 1].float())
        if i + 1 in keep:
            states.append(x)
    return torch.stack(states, dim=1)


def gaussian_log_density(x0: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x0; μ, σ²I) = −‖x0 − μ‖²/(2σ²) − (D/2)·log(2πσ²) per row, in float64 (its magnitude
    grows as D/σ²; float32 would round away the differences between classes)."""
    d = x0[0].numel()
    sq = (x0.double() - mu.double()).pow(2).flatten(1).sum(1)
    return -sq / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)


@torch.no_grad()
def state_log_likelihoods(eps_fn: EpsFn, x0, states, t_kept, num_classes: int, alphas_cumprod,
                          chunk_size: int = 256) -> torch.Tensor:
    """ℓ[b, y, j] = log N(x0_b; x̂0(x_{τ_j}, τ_j, y), σ_{τ_j}² I), σ_t² = (1−ᾱ_t)/ᾱ_t: [B, C, n], float64.

    The B·C·n (image, class, kept state) triples are flattened row-major and sent through the
    network in chunks of at most ``chunk_size`` inputs (as ``genrep.posterior.draw_errors``
    does): B·C·n evaluations, never B·C·n images at once.
    """
    batch, n = states.shape[:2]
    ac = alphas_cumprod.double().to(x0.device)[t_kept.to(x0.device)]  # ᾱ at the kept states, [n]
    t_kept = t_kept.to(x0.device)
    out = torch.empty(batch * num_classes * n, dtype=torch.float64, device=x0.device)
    for start in range(0, out.numel(), chunk_size):
        idx = torch.arange(start, min(start + chunk_size, out.numel()), device=x0.device)
        b, c, j = idx // (num_classes * n), (idx // n) % num_classes, idx % n
        x_t = states[b, j]
        eps = eps_fn(x_t.to(x0.dtype), t_kept[j], c).double()
        a = ac[j].view(-1, *([1] * (x_t.dim() - 1)))
        mu = (x_t.double() - (1 - a).sqrt() * eps) / a.sqrt()  # x̂0 in float64
        out[start:start + idx.numel()] = gaussian_log_density(x0[b], mu, (1 - ac[j]) / ac[j])
    return out.view(batch, num_classes, n)


def log_mean_exp(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log((1/n) Σ_j exp a_j) = logsumexp(a) − log n, stable for any magnitude of a."""
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


def batch_means_stderr(loglik: torch.Tensor) -> torch.Tensor:
    """Batch-means stderr of log_mean_exp(ℓ) over the n kept states (last dim): split them into
    b = max(1, ⌊√n⌋) contiguous blocks (sizes differ by at most 1), L_k = log_mean_exp of block k,
    stderr = std(L_1..L_b; Bessel) / √b. NaN when b = 1 (n < 4): one block has no spread, and NaN
    says "not estimated" where 0 would claim certainty (as ``mc_mean_stderr`` does for K = 1)."""
    n = loglik.shape[-1]
    b = max(1, math.isqrt(n))
    if b == 1:
        return torch.full_like(loglik[..., 0], float("nan"))
    blocks = torch.stack([log_mean_exp(block) for block in torch.tensor_split(loglik, b, dim=-1)], -1)
    return blocks.std(-1, correction=1) / math.sqrt(b)


def _check_noise(noise, batch: int, steps: int, shape, generator, device) -> torch.Tensor:
    """The given chain noise, shape-checked, or a fresh :func:`draw_chain_noise` from ``generator``."""
    if noise is None:
        return draw_chain_noise(steps, batch, shape, generator, device)
    if tuple(noise.shape) != (batch, steps, *shape):
        raise ValueError(f"noise must be [B={batch}, steps={steps}, *{tuple(shape)}] "
                         f"(draw_chain_noise), got {tuple(noise.shape)}")
    return noise.to(device)


def reverse_chain_posterior(eps_fn: EpsFn, x0: torch.Tensor, num_classes: int,
                            alphas_cumprod: torch.Tensor, *, steps: int, burn_in: int, thin: int,
                            tau_mc: float = 1.0, eta: float = 1.0, noise: torch.Tensor | None = None,
                            generator: torch.Generator | None = None, chunk_size: int = 256,
                            prior=None, start: int | None = None) -> McResult:
    """q(y|x) from the states of one reverse diffusion chain per image (GenRep; our reading).

    Chain. τ_0 > … > τ_{steps−1}: ``steps`` timesteps evenly spaced from ``start`` (default T−1,
    the paper's chain from pure noise) down to 0 (:func:`chain_timesteps`). From T−1 (ᾱ ≈ 4e-5)
    the first state keeps almost nothing of x0, and the null-label chain then denoises towards
    an image of its own: measured on perf P3b's network, every chain from T−1 is at chance (P3c),
    and in a 10-step diagnostic on 100 held-out digits starting at t = 400 gave 0.51 top-1 where
    T−1 gave 0.09 (docs/performance.md, P3c). x_{τ_0} = √ᾱ_{τ_0} x0 + √(1−ᾱ_{τ_0}) z_0: the chain is tied to the
    image, one chain per image shared by every class, stepped with the NULL label ∅ (class index
    ``num_classes``, the unconditional model) so that no class is favoured; step τ_i → τ_{i+1} is
    DDIM with η = ``eta`` (:func:`ddim_step`, η = 1 ancestral, η = 0 deterministic) from
    x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t. Nothing is clipped. Noise: ``noise`` [B, steps, *shape] from
    :func:`draw_chain_noise` (e.g. this rank's rows of a global draw), else drawn from
    ``generator``.

    Samples. State i is kept iff i ≥ burn_in and (i − burn_in) % thin == 0 (:func:`kept_indices`);
    n kept states.

    Likelihood. At each kept x_t and each class y:
        μ_{t,y} = x̂0(x_t, t, y) = (x_t − √(1−ᾱ_t) ε_θ(x_t, t, y))/√ᾱ_t,   σ_t² = (1−ᾱ_t)/ᾱ_t,
        log N(x0; μ, σ²I) = −‖x0 − μ‖²/(2σ²) − (D/2)·log(2πσ²),
        log p̂(x|y) = log (1/n) Σ_kept N(x0; μ_{t,y}, σ_t² I)  (torch.logsumexp − log n).
    Why x̂0 and this σ: the density is one of x0, so its mean must be an estimate of x0; x̂0 is the
    network's (Tweedie's E[x0 | x_t, y]). With ε* = (x_t − √ᾱ_t x0)/√(1−ᾱ_t), the noise that takes
    x0 to x_t, x̂0 − x0 = √((1−ᾱ_t)/ᾱ_t)·(ε* − ε̂): a unit ε-error is variance (1−ᾱ_t)/ᾱ_t on x0,
    and −‖x0 − μ‖²/(2σ_t²) = −‖ε* − ε̂‖²/2 exactly, the Diffusion Classifier's pixel-summed
    ε-error (the Bayes scale) at this state. The DDPM posterior mean μ̃_t(x_t, x̂0) =
    (√ᾱ_{t−1}β_t x̂0 + √α_t(1−ᾱ_{t−1}) x_t)/(1−ᾱ_t) is not used: it is a mean for x_{t−1}, a
    still-noisy state that keeps a share of x_t, not for x0; comparing x0 with it scores the chain's
    noise as much as the class. The second term, −(D/2)·log(2πσ_t²), is the same for every class
    at one state but weighs the states. The densities of different states differ by factors
    e^{O(D)}, so the log-mean-exp is within log n of the max over kept states (the published
    mean-of-densities formula implies this; it is not an average of log-densities). As a function
    of σ², log N peaks at σ² = ‖x0 − μ‖²/D (the per-pixel residual): for a class whose prediction
    is good to better than the chain end's σ_t, the smallest-σ_t states (the chain's end, τ → 0)
    dominate; for a poor prediction (a wrong class) an earlier, larger-σ_t state does, which
    still ranks it below a good one.

    Posterior. q(y|x) = softmax_y(log p̂(x|y)/τ_mc + log p(y)); ``prior`` None or "uniform":
    uniform; or [C] class frequencies (``genrep.posterior.log_prior``).

    Returns ``McResult``: probs [B, C] (float32); errors [B, C] = −log p̂(x|y), a negative
    log-likelihood in nats, LOWER IS BETTER as ``mc_posterior``'s errors (so −errors is the
    log-likelihood ``fit_temperature`` takes and probs = posterior(errors, τ_mc, log p)), float64;
    stderr [B, C]: :func:`batch_means_stderr` of log p̂ — the kept states are correlated (one
    chain), so it splits them into ⌊√n⌋ contiguous blocks and takes the std of the blocks'
    log-mean-exp over √(blocks); it estimates the spread of log p̂ between stretches of the chain,
    which also contains the systematic drift of σ_t along it (so read it as a rough scale, not a
    sampling error of a stationary chain); NaN when n < 4 (one block); evals = B·((last kept
    index) + n·C): the chain's null-label forwards up to the last kept state (steps − 1 when
    the chain's end is kept) plus n·C class-conditional ones; pred [B] = argmax probs (= argmin
    errors under a uniform prior); kept [B, C] = every class.
    """
    keep = kept_indices(steps, burn_in, thin)
    if tau_mc <= 0:
        raise ValueError(f"tau_mc must be > 0, got {tau_mc}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, shape = x0.shape[0], tuple(x0.shape[1:])
    log_p = log_prior(prior, num_classes)  # validates before any forward
    timesteps = chain_timesteps(steps, alphas_cumprod.shape[0], start)
    noise = _check_noise(noise, batch, steps, shape, generator, x0.device)
    states = run_chain(eps_fn, x0, timesteps, keep, alphas_cumprod, num_classes, eta, noise, chunk_size)
    loglik = state_log_likelihoods(eps_fn, x0, states, timesteps[keep], num_classes, alphas_cumprod,
                                   chunk_size)
    errors = -log_mean_exp(loglik)
    probs = posterior(errors, tau_mc, log_p)  # float64: pred is taken before rounding to float32
    evals = batch * (keep[-1] + len(keep) * num_classes)
    kept = torch.arange(num_classes, device=x0.device).expand(batch, -1)
    return McResult(probs.float(), errors, batch_means_stderr(loglik), evals, probs.argmax(1), kept)


__all__ = ["reverse_chain_posterior", "draw_chain_noise", "chain_timesteps", "kept_indices",
           "ddim_step", "predict_x0", "run_chain", "state_log_likelihoods", "gaussian_log_density",
           "log_mean_exp", "batch_means_stderr"]
