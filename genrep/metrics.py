"""Evaluation metrics (docs/evaluation.md): pure functions of tensors.

Perception: top-1, expected calibration error. Generation: Fréchet distance of features (in the
reference classifier's feature space here, not Inception's) and the held-out denoising loss at
fixed timesteps and fixed noise. Standard errors: binomial for accuracies, of the mean over
images for the held-out loss, bootstrap for the Fréchet distance.
"""
from __future__ import annotations

import math

import torch

from genrep.diffusion import q_sample
from genrep.losses import EpsFn


def top1(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> float:
    """acc = (1/N) Σ_i [argmax_c z_ic = y_i]; a 1-D input is taken as predictions already."""
    pred = logits_or_pred.argmax(-1) if logits_or_pred.dim() > 1 else logits_or_pred
    return (pred.cpu() == labels.cpu()).float().mean().item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = Σ_b (|B_b|/N)·|acc(B_b) − conf(B_b)|, B_b = {i : conf_i ∈ ((b−1)/M, b/M]}: M equal-width
    bins of the confidence conf_i = max_c p_ic (Guo et al. 2017, arXiv:1706.04599, eq. 3)."""
    probs, labels = probs.detach().double().cpu(), labels.cpu()
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    # bin b holds conf in ((b-1)/M, b/M]: ceil(conf·M) − 1, conf = 0 joins the first bin
    bins = (conf * n_bins).ceil().long().sub(1).clamp(0, n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).double()
    gap = torch.bincount(bins, weights=correct - conf, minlength=n_bins)  # Σ_{i∈B}(acc_i − conf_i)
    # (|B|/N)·|acc(B) − conf(B)| = |Σ_{i∈B}(correct_i − conf_i)| / N
    return (gap.abs().sum() / max(count.sum().item(), 1.0)).item()


def binomial_stderr(p: float, n: int) -> float:
    """SE(p̂) = √(p̂(1 − p̂)/n): a proportion over n independent items (NaN for n = 0)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def mean_stderr(values: torch.Tensor) -> float:
    """SE(x̄) = s/√n, s the sample standard deviation (n − 1); NaN for n < 2."""
    v = torch.as_tensor(values).detach().double().flatten().cpu()
    return (v.std(unbiased=True) / math.sqrt(v.numel())).item() if v.numel() > 1 else float("nan")


def feature_stats(features: torch.Tensor):
    """(μ, Σ) of features [N, D] in float64: μ = mean, Σ = unbiased covariance (N − 1)."""
    f = torch.as_tensor(features).detach().double().cpu()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(f.shape[0] - 1, 1)


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    """A^{1/2} of a symmetric PSD matrix by eigendecomposition; round-off negatives clipped to 0."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2}) (Heusel et al. 2017, arXiv:1706.08500).

    Tr((Σ1Σ2)^{1/2}) = Tr((√Σ1 Σ2 √Σ1)^{1/2}): Σ1Σ2 is similar to the symmetric PSD √Σ1 Σ2 √Σ1,
    whose square root an eigendecomposition gives stably in float64, even for the singular
    covariances of fewer samples than feature dimensions (no scipy.linalg.sqrtm, no complex parts).
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(a).double().cpu() for a in (mu1, mu2, sigma1, sigma2))
    r1 = _psd_sqrt(s1)
    w = torch.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = w.clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return max(d2.item(), 0.0)


def frechet_distance_stderr(features1: torch.Tensor, features2: torch.Tensor,
                            n_boot: int = 50, seed: int = 0) -> float:
    """SE(d²) ≈ sd over b = 1..B of d²(F1*_b, F2*_b), F*_b a resample with replacement of each set.

    The bootstrap standard error (Efron & Tibshirani 1993, ch. 6), seeded; B = 50 is within their
    25–200 for a standard error. Cost: B·(2 covariances + 2 eigendecompositions of D×D).
    """
    f1, f2 = (torch.as_tensor(f).detach().double().cpu() for f in (features1, features2))
    g = torch.Generator().manual_seed(seed)

    def resample(f: torch.Tensor) -> torch.Tensor:
        return f[torch.randint(len(f), (len(f),), generator=g)]

    d2 = [frechet_distance(*feature_stats(resample(f1)), *feature_stats(resample(f2)))
          for _ in range(n_boot)]
    return torch.tensor(d2, dtype=torch.float64).std().item() if n_boot > 1 else float("nan")


def fixed_noise(n: int, shape, seed: int, num: int) -> torch.Tensor:
    """ε [n, num, *shape]: image i's ``num`` draws come from a generator seeded by (seed, i) alone,
    so every trial and strategy sees the same noise on the same held-out image."""
    g = torch.Generator()
    out = torch.empty((n, num, *shape))
    for i in range(n):
        g.manual_seed(seed * 1_000_003 + i)
        out[i] = torch.randn((num, *shape), generator=g)
    return out


HELDOUT_TIMESTEPS = (50, 200, 500, 800)


@torch.no_grad()
def heldout_denoising_errors(model_eps: EpsFn, x0: torch.Tensor, labels: torch.Tensor,
                             alphas_cumprod: torch.Tensor, timesteps=HELDOUT_TIMESTEPS,
                             seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """e_{t,i} = ||ε_{i,t} − ε_θ(x_{i,t}, t, y_i)||² (pixel mean) per timestep and image at fixed t
    and fixed ε (``fixed_noise``): Float[len(timesteps), N]. N·len(timesteps) network evaluations."""
    noise = fixed_noise(x0.shape[0], x0.shape[1:], seed, len(timesteps)).to(x0.device)
    rows = []
    for j, t in enumerate(timesteps):
        sq = []
        for i in range(0, x0.shape[0], batch_size):
            x, eps = x0[i:i + batch_size], noise[i:i + batch_size, j].to(x0.dtype)
            tt = torch.full((x.shape[0],), t, device=x0.device, dtype=torch.long)
            pred = model_eps(q_sample(x, tt, eps, alphas_cumprod), tt, labels[i:i + batch_size])
            sq.append((pred.float() - eps.float()).pow(2).flatten(1).mean(1))
        rows.append(torch.cat(sq))
    return torch.stack(rows)


def heldout_denoising_loss(model_eps: EpsFn, x0: torch.Tensor, labels: torch.Tensor,
                           alphas_cumprod: torch.Tensor, timesteps=HELDOUT_TIMESTEPS,
                           seed: int = 0, batch_size: int = 256):
    """L_t = (1/N) Σ_i ||ε_i,t − ε_θ(x_t, t, y_i)||² (pixel mean) at fixed t and fixed ε
    (Ho et al. 2020, eq. 14 without the expectation over t); returns (mean_t L_t, {t: L_t}).

    N·len(timesteps) network evaluations (``heldout_denoising_errors``, averaged over images).
    """
    errors = heldout_denoising_errors(model_eps, x0, labels, alphas_cumprod, timesteps, seed, batch_size)
    return heldout_loss_of(errors, timesteps)


def heldout_loss_of(errors: torch.Tensor, timesteps=HELDOUT_TIMESTEPS):
    """L_t = (1/N) Σ_i e_{t,i} and L = (1/T) Σ_t L_t from errors [T, N]; returns (L, {t: L_t})."""
    per_t = {int(t): row.mean().item() for t, row in zip(timesteps, errors)}
    return sum(per_t.values()) / len(per_t), per_t


__all__ = ["top1", "expected_calibration_error", "feature_stats", "frechet_distance",
           "frechet_distance_stderr", "binomial_stderr", "mean_stderr", "heldout_denoising_loss",
           "heldout_denoising_errors", "heldout_loss_of", "fixed_noise", "HELDOUT_TIMESTEPS"]
