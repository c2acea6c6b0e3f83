"""The reverse-chain MCMC estimator of p(x|y): GenRep's second estimator of the teacher (issues 20, 30).

What the paper's public summaries give: the intermediate states of one reverse diffusion chain are
the Monte Carlo samples; the first m are dropped (burn-in, m = 50), every k-th of the rest is kept
(thinning, k = 2), p(x|y) ≈ (1/n) Σ_{kept t} N(x; μ_{t,y}, σ_t) with about 200 reverse steps, and
Bayes with a uniform prior gives p(y|x). Everything more specific here is OUR READING, two choices,
each a switch of :func:`reverse_chain_posterior` (``method.mc.chain``, ``method.mc.aggregate``):

- ``chain``: ``"tied"`` (default) steps the chain with the forward posterior q(x_s | x_t, x): the
  DDIM step with x in place of x̂0 and ε* = (x_t − √ᾱ_t·x)/√(1−ᾱ_t) in place of ε̂. No network
  evaluations; its states are exact draws of q(x_τ|x) (jointly, at η = 1, the forward process'
  states at the chain's timesteps). ``"free"`` steps it with the null-label network (the first
  reading): from T−1, √ᾱ₉₉₉ ≈ 4.9e-5, so its first state forgets x and it denoises towards an
  image of its own: at chance on the perf network (docs/performance.md, P3c).
- ``aggregate``: with d_j(y) = ‖ε*_j − ε_θ(x_τj, τ_j, y)‖² (a pixel sum) at kept state j,
  ``"noise_lme"`` (default) log p̂(x|y) = LME_j[−½ d_j], the paper's mean of densities taken in
  noise coordinates; ``"mean_log"`` (1/n)·Σ_j −½ d_j, the mean of the logs (the Diffusion
  Classifier on the chain's t-grid); ``"x0_lme"`` LME_j[log N(x; x̂0_j(y), σ_j² I)], the density
  of x in pixel space, = LME_j[−½ d_j − (D/2)·log(2πσ_j²)]: its normaliser swings by thousands of
  nats across t, so the LME is a hard max over states (the first reading; kept as a variant).

The result is the forward estimator's ``McResult``, with the same conventions (``errors`` lower is
better, ``probs`` = softmax(−errors/τ_mc + log p(c))). Notation as in genrep.diffusion (Ho et al.
2020, arXiv:2006.11239): x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε; DDIM steps as in Song et al. 2021
(arXiv:2010.02502, eq. 12 and 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from genrep.diffusion import q_sample, randn
from genrep.losses import EpsFn
from genrep.posterior import McResult, log_prior, posterior

CHAINS = ("tied", "free")


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

    State i is x_{τ_i}; state 0 is the image noised to τ_0 (T−1 by default: nearly pure noise, what
    burn-in drops), state steps−1 the chain's end at τ = 0. n = ⌈(steps − burn_in)/thin⌉ are kept.
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


# ---------------------------------------------------------------- the DDIM step
def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t (Ho et al. 2020, eq. 4 solved for x0); not clipped."""
    return (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)


def ddim_sigma(a_t: float, a_s: float, eta: float) -> float:
    """σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s) (Song et al. 2021, eq. 16); η = 1: DDPM's posterior."""
    return eta * math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))


def ddim_step(x_t, eps, a_t: float, a_s: float, eta: float, noise) -> torch.Tensor:
    """x_s = √ᾱ_s x̂0 + √(1−ᾱ_s−σ²) ε̂ + σ z for s < t (Song et al. 2021, eq. 12), σ from
    :func:`ddim_sigma`: η = 1 is DDPM-like ancestral noise, η = 0 deterministic. x̂0 is not clipped
    (diffusers' sampler clips it to [-1, 1]; a likelihood must not move the chain off x̂0)."""
    sigma = ddim_sigma(a_t, a_s, eta)
    direction = math.sqrt(max(1.0 - a_s - sigma**2, 0.0))  # max: rounding at η = 1, t → s
    return math.sqrt(a_s) * predict_x0(x_t, eps, a_t) + direction * eps + sigma * noise


def tied_step(eps_star: torch.Tensor, a_t: float, a_s: float, eta: float, noise) -> torch.Tensor:
    """ε*_s = (√(1−ᾱ_s−σ²)·ε*_t + σ·z)/√(1−ᾱ_s): :func:`ddim_step` with x̂0 = x and ε̂ = ε*_t, a draw
    of q_σ(x_s | x_t, x) (Song et al. 2021, eq. 7), written as the noise taking x to x_s.

    (√(1−ᾱ_s−σ²)² + σ²)/(1−ᾱ_s) = 1, so ε*_s ~ N(0, I) whatever η: x_s is an exact draw of
    q(x_s|x). At η = 1 corr(ε*_t, ε*_s) = √(ᾱ_t(1−ᾱ_s)/(ᾱ_s(1−ᾱ_t))) = √(SNR_t/SNR_s), the forward
    process' own; at η = 0 ε*_s = ε*_t: every state carries the same noise.
    """
    sigma = ddim_sigma(a_t, a_s, eta)
    direction = math.sqrt(max(1.0 - a_s - sigma**2, 0.0))
    return (direction * eps_star + sigma * noise) / math.sqrt(1.0 - a_s)


# ---------------------------------------------------------------- the chains
def _chunked_eps(eps_fn: EpsFn, x, t, labels, chunk_size: int) -> torch.Tensor:
    """ε_θ(x, t, c) for n inputs, at most ``chunk_size`` per forward, as float32."""
    return torch.cat([eps_fn(x[i:i + chunk_size], t[i:i + chunk_size], labels[i:i + chunk_size]).float()
                      for i in range(0, x.shape[0], chunk_size)])


def tied_chain(x0, timesteps, keep: list[int], alphas_cumprod, eta: float, noise) -> torch.Tensor:
    """The tied chain's kept states x_{τ_i} = √ᾱ_τ x + √(1−ᾱ_τ) ε*_{τ_i} (Ho et al. eq. 4), i ∈ keep:
    Tensor[B, n, *shape] in x0's dtype.

    ε*_{τ_0} = z_0, then :func:`tied_step` τ_i → τ_{i+1} with z_{i+1} (in float64): no network
    evaluations. The noise is carried, not the state, so x never leaks from a rounded x̂0.
    """
    ac = alphas_cumprod.double().cpu()
    eps_star, kept = noise[:, 0].double(), []
    for i in range(keep[-1] + 1):
        if i > 0:
            t_i, t_prev = int(timesteps[i]), int(timesteps[i - 1])
            eps_star = tied_step(eps_star, ac[t_prev].item(), ac[t_i].item(), eta, noise[:, i].double())
        if i in keep:
            kept.append(eps_star)
    eps = torch.stack(kept, dim=1)
    a = ac[timesteps[keep]].to(x0.device).view(1, -1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0.double().unsqueeze(1) + (1 - a).sqrt() * eps).to(x0.dtype)


@torch.no_grad()
def free_chain(eps_fn: EpsFn, x0, timesteps, keep: list[int], alphas_cumprod, null_class: int,
               eta: float, noise, chunk_size: int = 256) -> torch.Tensor:
    """The free (null-label) chain's kept states x_{τ_i}, i ∈ keep: Tensor[B, n, *shape].

    x_{τ_0} = √ᾱ x0 + √(1−ᾱ) z_0, then :func:`ddim_step` τ_i → τ_{i+1} with ε̂ = ε_θ(x, τ_i, ∅) up to
    the last kept state (later steps could not change a kept state): B·keep[−1] evaluations.
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


def noise_of_states(x0, states, t_kept, alphas_cumprod) -> torch.Tensor:
    """ε*_j = (x_{τ_j} − √ᾱ_{τ_j}·x)/√(1−ᾱ_{τ_j}): the noise that takes x to each state (Ho et al.
    eq. 4 solved for ε), [B, n, *shape] float64."""
    a = alphas_cumprod.double().to(x0.device)[t_kept.to(x0.device)].view(1, -1, *([1] * (x0.dim() - 1)))
    return (states.double() - a.sqrt() * x0.double().unsqueeze(1)) / (1 - a).sqrt()


@torch.no_grad()
def state_errors(eps_fn: EpsFn, states, eps_star, t_kept, num_classes: int,
                 chunk_size: int = 256) -> torch.Tensor:
    """d[b, y, j] = ‖ε*_{b,j} − ε_θ(x_{τ_j}, τ_j, y)‖², summed over the D pixels (the ELBO's scale,
    Ho et al. eq. 12): [B, C, n] float64.

    The B·C·n (image, class, kept state) triples are flattened row-major and sent through the
    network in chunks of at most ``chunk_size`` inputs (as ``genrep.posterior.draw_errors``
    does): B·C·n evaluations, never B·C·n images at once.
    """
    batch, n = states.shape[:2]
    t_kept = t_kept.to(states.device)
    out = torch.empty(batch * num_classes * n, dtype=torch.float64, device=states.device)
    for start in range(0, out.numel(), chunk_size):
        idx = torch.arange(start, min(start + chunk_size, out.numel()), device=states.device)
        b, c, j = idx // (num_classes * n), (idx // n) % num_classes, idx % n
        eps = eps_fn(states[b, j], t_kept[j], c).double()
        out[start:start + idx.numel()] = (eps_star[b, j] - eps).pow(2).flatten(1).sum(1)
    return out.view(batch, num_classes, n)


# ---------------------------------------------------------------- the aggregates
def log_mean_exp(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log((1/n) Σ_j exp a_j) = logsumexp(a) − log n, stable for any magnitude of a."""
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


def mean_over_states(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(1/n) Σ_j a_j: the mean of the states' log-densities."""
    return a.mean(dim)


def noise_log_density(d: torch.Tensor, var: torch.Tensor, dim: int) -> torch.Tensor:
    """ℓ_j = −½ d_j: log N(ε*_j; ε̂_j, I) up to the constant −(D/2)·log 2π, the same at every state
    (the density of the noise that reached x_τj, in noise coordinates; issue 30's V1/V2)."""
    return -0.5 * d


def x0_log_density(d: torch.Tensor, var: torch.Tensor, dim: int) -> torch.Tensor:
    """ℓ_j = log N(x; x̂0_j, σ_j² I) = −½ d_j − (D/2)·log(2πσ_j²), σ_j² = (1−ᾱ_j)/ᾱ_j, since
    x̂0 − x = √((1−ᾱ)/ᾱ)·(ε* − ε̂) (Ho et al. eq. 4): the density of x in pixel space."""
    return -0.5 * d - 0.5 * dim * torch.log(2 * math.pi * var)


@dataclass(frozen=True)
class Aggregate:
    """log p̂(x|y) = reduce_j ℓ_j(y): a per-state log-density and how the states are combined."""

    log_density: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    reduce: Callable[..., torch.Tensor]


AGGREGATES = {"noise_lme": Aggregate(noise_log_density, log_mean_exp),  # V2: the paper's mean
              "mean_log": Aggregate(noise_log_density, mean_over_states),  # V1: mean of the logs
              "x0_lme": Aggregate(x0_log_density, log_mean_exp)}  # pixel-space x̂0 density


def state_log_densities(d: torch.Tensor, t_kept, alphas_cumprod, dim: int, aggregate: str) -> torch.Tensor:
    """ℓ[b, y, j] of ``aggregate`` from the errors d [B, C, n] at the kept timesteps, float64."""
    a = alphas_cumprod.double().to(d.device)[t_kept.to(d.device)]
    return AGGREGATES[aggregate].log_density(d, (1 - a) / a, dim)


def lme_weights(loglik: torch.Tensor) -> torch.Tensor:
    """w_j = exp ℓ_j / Σ_k exp ℓ_k: each kept state's share of the log-mean-exp (last dim). A
    weight of 1 on one state is a hard max: the mean of densities then uses one state."""
    return torch.softmax(loglik, -1)


def batch_means_stderr(loglik: torch.Tensor, reduce=log_mean_exp) -> torch.Tensor:
    """Batch-means stderr of reduce(ℓ) over the n kept states (last dim): split them into
    b = max(1, ⌊√n⌋) contiguous blocks (sizes differ by at most 1), L_k = reduce of block k,
    stderr = std(L_1..L_b; Bessel) / √b. NaN when b = 1 (n < 4): one block has no spread, and NaN
    says "not estimated" where 0 would claim certainty (as ``mc_mean_stderr`` does for K = 1)."""
    n = loglik.shape[-1]
    b = max(1, math.isqrt(n))
    if b == 1:
        return torch.full_like(loglik[..., 0], float("nan"))
    blocks = torch.stack([reduce(block) for block in torch.tensor_split(loglik, b, dim=-1)], -1)
    return blocks.std(-1, correction=1) / math.sqrt(b)


def aggregate_errors(d: torch.Tensor, t_kept, alphas_cumprod, dim: int, aggregate: str):
    """(log p̂(x|y) [B, C], its batch-means stderr [B, C]) of ``aggregate`` from the errors d."""
    loglik = state_log_densities(d, t_kept, alphas_cumprod, dim, aggregate)
    reduce = AGGREGATES[aggregate].reduce
    return reduce(loglik), batch_means_stderr(loglik, reduce)


# ---------------------------------------------------------------- the estimator
@dataclass
class ChainErrors:
    """What one run of the chains measured, before aggregation: d [B, C, n] (float64), the kept
    timesteps t_kept [n], the pixel count D, and the network evaluations spent."""

    d: torch.Tensor
    t_kept: torch.Tensor
    dim: int
    evals: int


def _check_noise(noise, batch: int, steps: int, shape, generator, device) -> torch.Tensor:
    """The given chain noise, shape-checked, or a fresh :func:`draw_chain_noise` from ``generator``."""
    if noise is None:
        return draw_chain_noise(steps, batch, shape, generator, device)
    if tuple(noise.shape) != (batch, steps, *shape):
        raise ValueError(f"noise must be [B={batch}, steps={steps}, *{tuple(shape)}] "
                         f"(draw_chain_noise), got {tuple(noise.shape)}")
    return noise.to(device)


def check_chain(chain: str, eta: float) -> None:
    """A known chain, η in [0, 1], and η > 0 for the tied chain (at η = 0 :func:`tied_step` keeps
    ε* fixed: every kept state would carry the same noise, n copies of one draw)."""
    if chain not in CHAINS:
        raise ValueError(f"unknown chain {chain!r}; use one of {CHAINS}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if chain == "tied" and eta == 0:
        raise ValueError("the tied chain needs eta > 0 (1 by default): at eta = 0 every kept state "
                         "carries the same ε*")


@torch.no_grad()
def chain_errors(eps_fn: EpsFn, x0: torch.Tensor, num_classes: int, alphas_cumprod: torch.Tensor, *,
                 steps: int, burn_in: int, thin: int, chain: str = "tied", eta: float = 1.0,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 chunk_size: int = 256, start: int | None = None) -> ChainErrors:
    """d[b, y, j] = ‖ε*_j − ε_θ(x_τj, τ_j, y)‖² at the kept states of one chain per image.

    Evaluations: tied B·n·C (the chain itself costs none); free B·(keep[−1] + n·C).
    """
    keep = kept_indices(steps, burn_in, thin)
    check_chain(chain, eta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, shape = x0.shape[0], tuple(x0.shape[1:])
    timesteps = chain_timesteps(steps, alphas_cumprod.shape[0], start)
    noise = _check_noise(noise, batch, steps, shape, generator, x0.device)
    t_kept = timesteps[keep]
    if chain == "tied":
        states, chain_evals = tied_chain(x0, timesteps, keep, alphas_cumprod, eta, noise), 0
    else:
        states = free_chain(eps_fn, x0, timesteps, keep, alphas_cumprod, num_classes, eta, noise, chunk_size)
        chain_evals = keep[-1]
    # ε* of the states as the network sees them (x0's dtype): for the tied chain its own noise
    # up to that rounding, which 1/√(1−ᾱ_0) would otherwise amplify at τ = 0
    eps_star = noise_of_states(x0, states, t_kept, alphas_cumprod)
    d = state_errors(eps_fn, states, eps_star, t_kept, num_classes, chunk_size)
    return ChainErrors(d, t_kept, math.prod(shape), batch * (chain_evals + len(keep) * num_classes))


def reverse_chain_posterior(eps_fn: EpsFn, x0: torch.Tensor, num_classes: int,
                            alphas_cumprod: torch.Tensor, *, steps: int, burn_in: int, thin: int,
                            chain: str = "tied", aggregate: str = "noise_lme", tau_mc: float = 1.0,
                            eta: float = 1.0, noise: torch.Tensor | None = None,
                            generator: torch.Generator | None = None, chunk_size: int = 256,
                            prior=None, start: int | None = None) -> McResult:
    """q(y|x) = softmax_y(log p̂(x|y)/τ_mc + log p(y)) from the kept states of one chain per image
    (GenRep's reverse-chain estimator; our reading, module docstring).

    Chain. τ_0 > … > τ_{steps−1}: ``steps`` timesteps evenly spaced from ``start`` (default T−1,
    the paper's chain from pure noise) down to 0 (:func:`chain_timesteps`); x_{τ_0} = √ᾱ x0 +
    √(1−ᾱ) z_0, one chain per image shared by every class. ``chain="tied"``: :func:`tied_chain`
    (q(x_s | x_t, x), DDIM with x and ε*; needs η > 0); ``"free"``: :func:`free_chain` (DDIM with
    ε_θ(·, ·, ∅)). Noise: ``noise`` [B, steps, *shape] from :func:`draw_chain_noise` (e.g. this
    rank's rows of a global draw), else drawn from ``generator``.

    Samples. State i is kept iff i ≥ burn_in and (i − burn_in) % thin == 0 (:func:`kept_indices`);
    n kept states. At each, ε* = (x_τ − √ᾱ_τ x)/√(1−ᾱ_τ) (exact for the tied chain; for the free
    one, the noise its state would need) and d_j(y) = ‖ε*_j − ε_θ(x_τj, τ_j, y)‖² (:func:`state_errors`).

    Likelihood (``aggregate``, :data:`AGGREGATES`): ``noise_lme`` LME_j[−½ d_j]; ``mean_log``
    (1/n)·Σ_j −½ d_j; ``x0_lme`` LME_j[−½ d_j − (D/2)·log(2πσ_j²)], σ_j² = (1−ᾱ_j)/ᾱ_j.

    Posterior. ``prior`` None or "uniform": uniform; or [C] class frequencies (``log_prior``).

    Returns ``McResult``: probs [B, C] (float32); errors [B, C] = −log p̂(x|y) in nats, LOWER IS
    BETTER as ``mc_posterior``'s errors (−errors is the log-likelihood ``fit_temperature`` takes),
    float64; stderr [B, C]: :func:`batch_means_stderr` of log p̂ over ⌊√n⌋ contiguous blocks of
    the (correlated) kept states, with the aggregate's own reduction; a rough scale, since it also
    holds the drift of d along t; NaN when n < 4; evals: tied B·n·C, free B·(keep[−1] + n·C);
    pred [B] = argmax probs; kept [B, C] = every class.
    """
    kept_indices(steps, burn_in, thin)
    if tau_mc <= 0:
        raise ValueError(f"tau_mc must be > 0, got {tau_mc}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; use one of {tuple(AGGREGATES)}")
    check_chain(chain, eta)
    log_p = log_prior(prior, num_classes)  # validates before any forward
    run = chain_errors(eps_fn, x0, num_classes, alphas_cumprod, steps=steps, burn_in=burn_in, thin=thin,
                       chain=chain, eta=eta, noise=noise, generator=generator, chunk_size=chunk_size,
                       start=start)
    log_lik, stderr = aggregate_errors(run.d, run.t_kept, alphas_cumprod, run.dim, aggregate)
    errors = -log_lik
    probs = posterior(errors, tau_mc, log_p)  # float64: pred is taken before rounding to float32
    kept = torch.arange(num_classes, device=x0.device).expand(x0.shape[0], -1)
    return McResult(probs.float(), errors, stderr, run.evals, probs.argmax(1), kept)


__all__ = ["reverse_chain_posterior", "chain_errors", "aggregate_errors", "draw_chain_noise",
           "chain_timesteps", "kept_indices", "ddim_sigma", "ddim_step", "tied_step", "tied_chain",
           "free_chain", "noise_of_states", "state_errors", "state_log_densities", "lme_weights",
           "log_mean_exp", "mean_over_states", "batch_means_stderr", "AGGREGATES", "CHAINS",
           "ChainErrors", "check_chain"]
