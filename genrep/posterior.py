"""The Monte Carlo teacher: the network's own Bayes posterior over classes.

Diffusion Classifier reading (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", arXiv:2303.16203): log p(x|c) ≈ −E_{t,ε} w(t)·||ε − ε_θ(x_t, t, c)||² + const (the
ELBO), so q(c|x) = softmax_c(−e_c/τ_mc + log p(c)). A second estimator (reverse-chain errors)
would be a new function returning the same `McResult`.

The Bayes scale. The ELBO's ||ε − ε_θ||² is a SUM over the D = channels·H·W pixels (Ho et al.
2020, eq. 12), so e_c is a pixel sum by default (`scale="sum"`); `scale="mean"` (the estimator
before issue 19) divides it by D, which makes τ_mc = 1 on means τ = D on the Bayes scale: a
near-uniform teacher (label smoothing). The time weighting (`weight`) is "uniform" (w = 1:
Ho et al.'s L_simple, the Diffusion Classifier's choice; not a bound, so its scale is only
proportional to log p(x|c) and τ_mc must be calibrated), "elbo" (the variational bound's own
weights, `elbo_weight`, times T, so e_c estimates Σ_t L_{t−1}), or any Tensor[T].
Calibration: `fit_temperature` fits τ_mc by held-out NLL (temperature scaling, Guo et al. 2017);
`teacher_quality` reports the teacher's top-1, NLL, ECE, mean max-probability and entropy.
Prior: uniform by default; a class-frequency vector (e.g. the training set's counts) adds
log p(c) before the softmax (`log_prior`). Which prior the paper uses is not stated in its public
summaries; uniform is the Diffusion Classifier's choice and ours by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from genrep.diffusion import q_sample, randn, rng_device
from genrep.losses import EpsFn
from genrep.metrics import expected_calibration_error, top1


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


def elbo_weight(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """w(t) = β_t²/(2σ_t²·α_t·(1−ᾱ_t)) with σ_t² = β_t, i.e. β_t/(2·α_t·(1−ᾱ_t)): Tensor[T] (float64).

    Ho et al. 2020 (arXiv:2006.11239), eq. 12: with μ_θ = (x_t − β_t/√(1−ᾱ_t)·ε_θ)/√α_t (eq. 11)
    and the forward posterior's mean μ̃_t of the same form in ε, the KL term between Gaussians of
    variance σ_t² is L_{t−1} − C = E ||μ̃_t − μ_θ||²/(2σ_t²) = β_t²/(2σ_t²α_t(1−ᾱ_t))·E ||ε − ε_θ||²
    (a pixel sum); σ_t² = β_t (their first choice) cancels one β_t. β_t and α_t = 1 − β_t are read
    off ᾱ: β_t = 1 − ᾱ_t/ᾱ_{t−1}, ᾱ_{−1} = 1. Index t = 0 (Ho et al.'s t = 1, whose term is the
    discrete decoder L_0) gets the same Gaussian form: w = 1/(2α_0). The weights are steep: on the
    cosine schedule with T = 1000 (β capped at 0.999) w ≈ 0.5 at t = 0, 0.003 at t = 500, ≈ 500 at T−1,
    so "elbo" draws near T dominate e_c (the bound's known variance, Nichol & Dhariwal 2021 §3.3).
    """
    ac = alphas_cumprod.double()
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    beta = 1 - ac / prev
    return beta / (2 * (1 - beta) * (1 - ac))


def timestep_weight(weight, t: torch.Tensor, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """w(t): "uniform" → 1 (the Diffusion Classifier's choice), "elbo" → T·`elbo_weight`[t]
    (t is uniform on T steps, so the mean over draws estimates Σ_t L_{t−1}; needs
    ``alphas_cumprod``), or a Tensor[T] of weights."""
    if isinstance(weight, str):
        if weight == "elbo":
            if alphas_cumprod is None:
                raise ValueError("weight='elbo' needs alphas_cumprod")
            w = elbo_weight(alphas_cumprod) * alphas_cumprod.shape[0]
            return w.float().to(t.device)[t]
        if weight != "uniform":
            raise ValueError(f"unknown weight {weight!r}; use 'uniform', 'elbo' or a Tensor[T]")
        return torch.ones(t.shape, device=t.device)
    return weight.to(t.device).float()[t]


SCALES = ("sum", "mean")


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use 'sum' (the Bayes scale) or 'mean'")


def pixel_reduce(sq: torch.Tensor, scale: str) -> torch.Tensor:
    """||·||² per row of sq [N, ...]: the sum over pixels (the ELBO's scale) or their mean (÷ D)."""
    check_scale(scale)
    return sq.flatten(1).sum(1) if scale == "sum" else sq.flatten(1).mean(1)


def _as_class_grid(classes: torch.Tensor, batch: int, device) -> torch.Tensor:
    """Candidate classes as [B, C'] (a [C'] vector is the same set for every image)."""
    classes = classes.to(device=device, dtype=torch.long)
    return classes.expand(batch, -1) if classes.dim() == 1 else classes


@torch.no_grad()
def draw_errors(eps_fn: EpsFn, x0, t, eps, classes, alphas_cumprod, weight="uniform",
                chunk_size: int = 256, scale: str = "sum") -> torch.Tensor:
    """w(t_k) ||ε_k − ε_θ(x_{t_k}, t_k, c)||² per draw: [B, C', K]; summed over pixels
    (``scale="sum"``, the ELBO's scale) or their mean (``"mean"``, D times smaller).

    The B·C'·K (image, class, draw) triples are flattened and sent through the network in chunks
    of at most `chunk_size` inputs: one batched forward for all classes × draws, peak memory
    bounded by the chunk, and x_t built per chunk (never B·C'·K images at once).
    """
    check_scale(scale)  # before any forward
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
        flat[start:start + idx.numel()] = pixel_reduce((eps_i.float() - eps_pred.float()).pow(2), scale)
    t_grid = t[:, None, :].expand(batch, n_cls, k)
    return flat.view(batch, n_cls, k) * timestep_weight(weight, t_grid, alphas_cumprod)


def mc_mean_stderr(draws: torch.Tensor):
    """e = (1/K) Σ_k d_k and its standard error s/√K (s: sample std over the K draws, K ≥ 2)."""
    k = draws.shape[-1]
    std = draws.std(-1, correction=1) if k > 1 else torch.full_like(draws[..., 0], float("nan"))
    return draws.mean(-1), std / k**0.5


def class_errors(eps_fn: EpsFn, x0, t, eps, classes, alphas_cumprod, weight="uniform",
                 chunk_size: int = 256, scale: str = "sum"):
    """e_c = (1/K) Σ_k w(t_k) ||ε_k − ε_θ(x_{t_k}, t_k, c)||² and its stderr, both [B, C']."""
    return mc_mean_stderr(draw_errors(eps_fn, x0, t, eps, classes, alphas_cumprod, weight, chunk_size,
                                      scale))


def log_prior(prior, num_classes: int) -> torch.Tensor | None:
    """log p(c) [C] from class frequencies (counts or probabilities, normalised here); None or
    "uniform" → None (a uniform prior adds a constant, which the softmax ignores). A class of
    frequency 0 gets log p = −inf: the posterior never gives it mass."""
    if prior is None or (isinstance(prior, str) and prior == "uniform"):
        return None
    p = torch.as_tensor(prior, dtype=torch.float64).flatten()
    if p.numel() != num_classes or not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"prior must be 'uniform' or {num_classes} finite non-negative class "
                         f"frequencies with a positive sum, got {prior!r}")
    return (p / p.sum()).log()


def posterior(errors: torch.Tensor, tau_mc: float = 1.0, log_prior=None) -> torch.Tensor:
    """q(c|x) = softmax_c(−e_c/τ_mc + log p(c)) (Bayes with log p(x|c) ≈ −e_c; uniform prior default)."""
    logits = -errors / tau_mc
    if log_prior is not None:
        logits = logits + log_prior.to(logits)
    return torch.softmax(logits, dim=-1)


def temperature_nll(log_lik: torch.Tensor, labels: torch.Tensor, tau: float, log_p=None) -> float:
    """NLL(τ) = −(1/N) Σ_i log softmax(log_lik_i/τ + log p)[y_i], in float64."""
    logits = log_lik.double() / tau
    if log_p is not None:
        logits = logits + log_p.to(logits)
    return torch.nn.functional.cross_entropy(logits, labels.long().to(logits.device)).item()


GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618…: the interval shrinks by this factor per evaluation


def fit_temperature(log_lik: torch.Tensor, labels: torch.Tensor, prior=None,
                    bounds: tuple[float, float] = (1e-4, 1e6), tol: float = 1e-7) -> float:
    """τ* = argmin_{τ>0} NLL(τ) of softmax(log_lik/τ + log p(c)) on labelled data (temperature
    scaling, Guo et al. 2017, "On Calibration of Modern Neural Networks", arXiv:1706.04599).

    log_lik [N, C] is log p(x_i|c) up to a per-image constant: −e_c (``McResult.errors``) for
    the teacher. With β = 1/τ the NLL is convex in β (log-sum-exp of functions linear in β minus a
    linear one), hence unimodal in log τ, so a golden-section search on log τ over ``bounds``
    finds it: deterministic, about log(log(hi/lo)/tol)/log(1/0.618) ≈ 40 evaluations of N·C work.
    The bounds (1e-4, 1e6) cover errors summed over up to ~10⁶ pixels; a τ* at a bound means the
    data want a sharper (lo) or flatter (hi: the teacher is no better than the prior) posterior
    than the bounds allow, and the bound is returned.
    """
    if log_lik.dim() != 2 or labels.shape != log_lik.shape[:1]:
        raise ValueError(f"need log_lik [N, C] and labels [N], got {tuple(log_lik.shape)}, "
                         f"{tuple(labels.shape)}")
    lo, hi = bounds
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"bounds must satisfy 0 < lo < hi < inf, got {bounds}")
    log_p = log_prior(prior, log_lik.shape[1])
    nll = lambda log_tau: temperature_nll(log_lik, labels, math.exp(log_tau), log_p)  # noqa: E731
    a, b = math.log(lo), math.log(hi)
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    f_c, f_d = nll(c), nll(d)
    while b - a > tol:
        if f_c <= f_d:  # the minimum lies in [a, d]
            b, d, f_d = d, c, f_c
            c = b - GOLDEN * (b - a)
            f_c = nll(c)
        else:  # in [c, b]
            a, c, f_c = c, d, f_d
            d = a + GOLDEN * (b - a)
            f_d = nll(d)
    return math.exp((a + b) / 2)


def teacher_quality(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """The teacher's own quality on labelled images, probs [N, C] (rows sum to 1), labels [N]:
    top1 (↑), nll = −(1/N) Σ_i log q(y_i|x_i) (↓; q floored at the float64 tiny, so a 0 costs ~708,
    not inf; log C is the uniform teacher's), ece (↓; ``genrep.metrics.expected_calibration_error``),
    mean_max_prob = (1/N) Σ_i max_c q_ic and mean_entropy = (1/N) Σ_i −Σ_c q_ic log q_ic (nats;
    0·log 0 = 0; log C is uniform, the label-smoothing ε it acts like is readable off it)."""
    p = probs.detach().double().cpu()
    y = labels.long().cpu()
    nll = -p.gather(1, y[:, None]).clamp_min(torch.finfo(p.dtype).tiny).log().mean()
    entropy = -torch.special.xlogy(p, p).sum(1).mean()
    return {"top1": top1(p, y), "nll": nll.item(), "ece": expected_calibration_error(p, y, n_bins),
            "mean_max_prob": p.max(1).values.mean().item(), "mean_entropy": entropy.item()}


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
                 draw=None, scale: str = "sum", prior=None) -> McResult:
    """q(c|x) from K shared Monte Carlo draws; B·K·C network evaluations without pruning,
    B·(prune_k·C + (K − prune_k)·prune_keep) with it.

    ``scale`` ("sum": the Bayes scale, default; "mean": ÷ D as before) and ``weight``
    ("uniform", "elbo" or a Tensor[T]) set e_c's scale; ``prior`` (None/"uniform" or class
    frequencies [C]) adds log p(c) before the softmax; ``tau_mc`` a fixed or fitted temperature
    (``fit_temperature`` on −errors of held-out labelled images).

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
    kw = dict(alphas_cumprod=alphas_cumprod, weight=weight, chunk_size=chunk_size, scale=scale)
    log_p = log_prior(prior, num_classes)
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
    probs = posterior(errors, tau_mc, log_p)
    # the Bayes decision over the kept classes: argmin e_c with a uniform prior, else argmax of
    # −e_c/τ + log p(c) (ties: the first, as argmin's)
    score = -errors / tau_mc + (log_p.to(errors) if log_p is not None else 0.0)
    pred = kept.gather(1, score.gather(1, kept).argmax(1, keepdim=True)).squeeze(1)
    return McResult(probs, errors, stderr, evals, pred, kept)
