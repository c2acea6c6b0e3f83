"""The Monte Carlo teacher: the network's own Bayes posterior over classes.

Diffusion Classifier reading (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", arXiv:2303.16203): log p(x|c) ≈ −E_{t,ε} ||ε − ε_θ(x_t, t, c)||² + const (the ELBO),
so q(c|x) = softmax_c(−e_c/τ_mc). A second estimator (reverse-chain errors) would be a new
function returning the same `McResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genrep.diffusion import q_sample, randn, rng_device
from genrep.losses import EpsFn


@dataclass
class McResult:
    probs: torch.Tensor  # [B, C] q(c|x) over every class (pruned ones from shifted estimates)
    errors: torch.Tensor  # [B, C] e_c; a pruned class: its first round shifted (shifted_errors)
    stderr: torch.Tensor  # [B, C] Monte Carlo stderr of e_c; a pruned class: of its first round
    evals: int  # network evaluations actually spent
    pred: torch.Tensor  # [B] argmax over the classes that got all K draws (all, unpruned)
    kept: torch.Tensor  # [B, keep] the classes that got all K draws (every class, unpruned)


def draw_mc(k: int, batch: int, shape, num_timesteps: int, generator=None, device="cpu"):
    """K pairs (t_k, ε_k) per image, shared by all classes: t [B, K], ε [B, K, *shape].

    t is stratified: t_k = ⌊(k + u_k)·T/K⌋, u_k ~ U[0,1), one draw in each of K equal strata of
    [0, T). Each t_k is still marginally uniform, so E_t is unbiased, but the draws cannot pile up
    at one end of the schedule, where the error's scale differs most: lower variance than i.i.d. t.
    """
    u = torch.rand((batch, k), generator=generator, device=rng_device(generator, device))
    strata = torch.arange(k, device=u.device, dtype=u.dtype)
    t = ((strata + u) * num_timesteps / max(k, 1)).long().clamp_(0, num_timesteps - 1)
    eps = randn((batch, k, *shape), generator, u.device)
    return t.to(device), eps.to(device)


def timestep_weight(weight, t: torch.Tensor) -> torch.Tensor:
    """w(t): "uniform" → 1 (the Diffusion Classifier's choice), or a Tensor[T] of weights."""
    if isinstance(weight, str):
        if weight != "uniform":
            raise ValueError(f"unknown weight {weight!r}; use 'uniform' or a Tensor[T]")
        return torch.ones(t.shape, device=t.device)
    return weight.to(t.device).float()[t]


def _as_class_grid(classes: torch.Tensor, batch: int, device) -> torch.Tensor:
    """Candidate classes as [B, C'] (a [C'] vector is the same set for every image)."""
    classes = classes.to(device=device, dtype=torch.long)
    return classes.expand(batch, -1) if classes.dim() == 1 else classes


@torch.no_grad()
def draw_errors(eps_fn: EpsFn, x0, t, eps, classes, alphas_cumprod, weight="uniform",
                chunk_size: int = 256) -> torch.Tensor:
    """w(t_k) ||ε_k − ε_θ(x_{t_k}, t_k, c)||² (mean over pixels) per draw: [B, C', K].

    The B·C'·K (image, class, draw) triples are flattened and sent through the network in chunks
    of at most `chunk_size` inputs: one batched forward for all classes × draws, peak memory
    bounded by the chunk, and x_t built per chunk (never B·C'·K images at once).
    """
    batch, k = t.shape
    grid = _as_class_grid(classes, batch, x0.device)
    n_cls = grid.shape[1]
    t, eps = t.to(x0.device), eps.to(x0.device)
    flat = torch.empty(batch * n_cls * k, device=x0.device)
    for start in range(0, flat.numel(), chunk_size):
        idx = torch.arange(start, min(start + chunk_size, flat.numel()), device=x0.device)
        b, c, j = idx // (n_cls * k), (idx // k) % n_cls, idx % k  # row-major [B, C', K]
        t_i, eps_i = t[b, j], eps[b, j]
        eps_pred = eps_fn(q_sample(x0[b], t_i, eps_i, alphas_cumprod), t_i, grid[b, c])
        flat[start:start + idx.numel()] = (eps_i.float() - eps_pred.float()).pow(2).flatten(1).mean(1)
    t_grid = t[:, None, :].expand(batch, n_cls, k)
    return flat.view(batch, n_cls, k) * timestep_weight(weight, t_grid)


def mc_mean_stderr(draws: torch.Tensor):
    """e = (1/K) Σ_k d_k and its standard error s/√K (s: sample std over the K draws, K ≥ 2)."""
    k = draws.shape[-1]
    std = draws.std(-1, correction=1) if k > 1 else torch.full_like(draws[..., 0], float("nan"))
    return draws.mean(-1), std / k**0.5


def class_errors(eps_fn: EpsFn, x0, t, eps, classes, alphas_cumprod, weight="uniform",
                 chunk_size: int = 256):
    """e_c = (1/K) Σ_k w(t_k) ||ε_k − ε_θ(x_{t_k}, t_k, c)||² and its stderr, both [B, C']."""
    return mc_mean_stderr(draw_errors(eps_fn, x0, t, eps, classes, alphas_cumprod, weight, chunk_size))


def posterior(errors: torch.Tensor, tau_mc: float = 1.0, log_prior=None) -> torch.Tensor:
    """q(c|x) = softmax_c(−e_c/τ_mc + log p(c)) (Bayes with log p(x|c) ≈ −e_c; uniform prior default)."""
    logits = -errors / tau_mc
    if log_prior is not None:
        logits = logits + log_prior
    return torch.softmax(logits, dim=-1)


def shifted_errors(first: torch.Tensor, kept: torch.Tensor, kept_full: torch.Tensor) -> torch.Tensor:
    """ê_c = e_c^(1) + (1/|S|) Σ_{s∈S} (e_s − e_s^(1)) for a pruned class c ∉ S, e_s for s ∈ S.

    e^(1) [B, C] is the first round's mean error (prune_k draws, every class), e_s [B, |S|] the
    all-K mean of the kept classes S. The draws are shared by all classes, so most of a draw's
    error is common to every class (the timestep sets its scale) and the kept classes' mean shift
    from the first round to all K draws estimates that common part for the pruned classes too: a
    pruned class keeps a finite, first-round-ranked error instead of +inf, and the posterior gives
    it a small probability, not 0. Ours (a control-variate-style correction), not from Li et al.
    """
    offset = (kept_full - first.gather(1, kept)).mean(1, keepdim=True)
    return (first + offset).scatter(1, kept, kept_full)


def first_round_strata(k: int, prune_k: int) -> list[int]:
    """The ``prune_k`` of the K timestep strata nearest the middle of the schedule.

    That is where the classes differ most: at small t the ε-error is large and noisy for every
    class (x_t ≈ x, ε barely identifiable), at large t it is small and nearly class-independent
    (x_t ≈ ε). Measured on digits16 after 300 steps, top-1 from one draw per stratum (K = 8):
    0.22 at t≈60, 0.59 at t≈435, 0.69 at t≈560, 0.43 at t≈940 (docs/performance.md, P3b).
    """
    order = sorted(range(k), key=lambda j: (abs(j + 0.5 - k / 2), -j))
    return sorted(order[:prune_k])


def _pruned_draws(eps_fn, x0, num_classes, k, prune_k, prune_keep, draw, **kw):
    """Two rounds over the *same* K stratified draws the full estimator uses (Li et al. 2023,
    Sec. 3.3, with the rounds split by stratum): the prune_k middle strata on all classes, then
    the other K − prune_k on the `prune_keep` lowest-error ones. A kept class's error is exactly
    its full K-draw estimate, so the pruned answer differs from the full one only when the full
    winner was pruned. Returns kept [B, keep], draws [B, keep, K], first round [B, C, prune_k]."""
    if not 0 < prune_k <= k:
        raise ValueError(f"prune_k must be in (0, k={k}], got {prune_k}")
    t, eps = draw(k)
    first = first_round_strata(k, prune_k)
    rest = [j for j in range(k) if j not in first]
    d1 = draw_errors(eps_fn, x0, t[:, first], eps[:, first], torch.arange(num_classes), **kw)
    kept = d1.mean(-1).topk(prune_keep, dim=1, largest=False).indices
    d2 = draw_errors(eps_fn, x0, t[:, rest], eps[:, rest], kept, **kw)
    d1_kept = d1.gather(1, kept[..., None].expand(-1, -1, prune_k))
    return kept, torch.cat([d1_kept, d2], dim=-1), d1  # mean over all K = weighted mean of rounds


def mc_posterior(eps_fn: EpsFn, x0: torch.Tensor, num_classes: int, k: int,
                 alphas_cumprod: torch.Tensor, tau_mc: float = 1.0, chunk_size: int = 256,
                 prune_k: int | None = None, prune_keep: int | None = None,
                 generator: torch.Generator | None = None, weight="uniform",
                 draw=None) -> McResult:
    """q(c|x) from K shared Monte Carlo draws; B·K·C network evaluations without pruning,
    B·(prune_k·C + (K − prune_k)·prune_keep) with it.

    With pruning, the prediction is the best of the kept classes (the Diffusion Classifier's
    decision), and the posterior covers every class: a pruned class's error is its first round
    shifted by the kept classes' mean change (:func:`shifted_errors`), so the teacher's soft
    target stays an estimate of the full one (a pruned class at probability 0 made it a sharp,
    different distribution: docs/performance.md, P3acc).

    ``draw(n) -> (t [B, n], ε [B, n, ...])`` replaces the default :func:`draw_mc` from
    ``generator`` (the harness passes this rank's rows of draws made for the global batch, so a
    data-parallel run draws what a 1-worker run draws); it is called once per round.
    """
    batch = x0.shape[0]
    kw = dict(alphas_cumprod=alphas_cumprod, weight=weight, chunk_size=chunk_size)
    if draw is None:
        draw = lambda n: draw_mc(n, batch, x0.shape[1:], alphas_cumprod.shape[0], generator, x0.device)  # noqa: E731
    if prune_keep is None or prune_keep >= num_classes:
        kept = torch.arange(num_classes, device=x0.device).expand(batch, -1)
        errors, stderr = mc_mean_stderr(draw_errors(eps_fn, x0, *draw(k), kept, **kw))
        evals = batch * k * num_classes
    else:
        kept, draws, first = _pruned_draws(eps_fn, x0, num_classes, k, prune_k, prune_keep, draw, **kw)
        evals = batch * (prune_k * num_classes + (k - prune_k) * prune_keep)
        kept_mean, kept_stderr = mc_mean_stderr(draws)
        first_mean, first_stderr = mc_mean_stderr(first)
        errors = shifted_errors(first_mean, kept, kept_mean)
        stderr = first_stderr.scatter(1, kept, kept_stderr)
    probs = posterior(errors, tau_mc)
    pred = kept.gather(1, errors.gather(1, kept).argmin(1, keepdim=True)).squeeze(1)
    return McResult(probs, errors, stderr, evals, pred, kept)
