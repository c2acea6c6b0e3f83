"""Evaluation metrics (docs/evaluation.md): pure functions of tensors.

Perception: top-1, expected calibration error. Generation: Fréchet distance of features (in the
reference classifier's feature space here, not Inception's) and the held-out denoising loss at
fixed timesteps and fixed noise; the kernel distance (KID's unbiased MMD², unbiased at small n
where the Fréchet distance is not). Standard errors: binomial for accuracies, of the mean over
images for the held-out loss, bootstrap for the Fréchet distance, jackknife for the kernel distance.
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
    25–200 for a standard error. Both sets are resampled (in the evaluation: the held-out images
    and the samples), so it is the spread over both draws; to first order it is the delta
    method's, 2‖μ1 − μ2‖·√(1/n1 + 1/n2) along the mean shift for equal unit covariances
    (tests/genrep/test_generation_metrics.py). Cost: B·(2 covariances + 2 eigendecompositions of D×D).
    """
    f1, f2 = (torch.as_tensor(f).detach().double().cpu() for f in (features1, features2))
    g = torch.Generator().manual_seed(seed)

    def resample(f: torch.Tensor) -> torch.Tensor:
        return f[torch.randint(len(f), (len(f),), generator=g)]

    d2 = [frechet_distance(*feature_stats(resample(f1)), *feature_stats(resample(f2)))
          for _ in range(n_boot)]
    return torch.tensor(d2, dtype=torch.float64).std().item() if n_boot > 1 else float("nan")


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (xᵀy/d + 1)³ for every pair of rows, [m, n] in float64: KID's kernel
    (Bińkowski et al. 2018, arXiv:1801.01401, sec. 3), d the feature dimension."""
    a, b = (torch.as_tensor(f).detach().double().cpu() for f in (a, b))
    return (a @ b.T / a.shape[1] + 1) ** 3


def _kid_terms(features1, features2):
    """Kernel sums of the unbiased MMD²: row sums r1 = Σ_{j≠i} k(x_i, x_j), r2 likewise for y,
    and the cross sums c1_i = Σ_j k(x_i, y_j), c2_j = Σ_i k(x_i, y_j)."""
    k11, k22 = polynomial_kernel(features1, features1), polynomial_kernel(features2, features2)
    k12 = polynomial_kernel(features1, features2)
    r1, r2 = k11.sum(1) - k11.diagonal(), k22.sum(1) - k22.diagonal()
    return r1, r2, k12.sum(1), k12.sum(0)


def _mmd2(s11, s22, s12, m, n):
    """MMD²_u = S_xx/(m(m−1)) + S_yy/(n(n−1)) − 2·S_xy/(mn) from the kernel sums (i ≠ j within a set)."""
    return s11 / (m * (m - 1)) + s22 / (n * (n - 1)) - 2 * s12 / (m * n)


def kernel_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """KID = MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i,x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i,y_j) − 2/(mn) Σ_{i,j} k(x_i,y_j),
    k the cubic polynomial kernel (Bińkowski et al. 2018, arXiv:1801.01401, eq. 3 and sec. 3).

    Unbiased at every m, n ≥ 2 (the Fréchet distance is biased upward at small n: ≈ 34 for two
    draws of 180 and 500 points from one 128-d N(0, I), docs/evaluation.md), so it may be
    negative when the two sets come from one distribution. Cost: (m + n)²·d multiply-adds.
    """
    r1, r2, c1, _ = _kid_terms(features1, features2)
    return _mmd2(r1.sum(), r2.sum(), c1.sum(), len(r1), len(r2)).item()


def kernel_distance_stderr(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """SE(MMD²_u) by the two-sample delete-one jackknife (Arvesen 1969, Ann. Math. Stat. 40):
    V = (m−1)/m Σ_i (θ₍₋ᵢ₎ − θ̄₍·₎)² + (n−1)/n Σ_j (θ₍₋ⱼ₎ − θ̄₍·₎)², θ₍₋ᵢ₎ the estimate without x_i.

    Deterministic, and every θ₍₋ᵢ₎ is exact from the kernel sums (no resample repeats a point,
    which would add k(x, x) to the i ≠ j sums as a bootstrap does); the jackknife variance is
    conservative in expectation (Efron & Stein 1981). NaN when a set has fewer than 3 points.
    """
    r1, r2, c1, c2 = _kid_terms(features1, features2)
    m, n = len(r1), len(r2)
    if min(m, n) < 3:
        return float("nan")
    s11, s22, s12 = r1.sum(), r2.sum(), c1.sum()
    # without x_i: S_xx loses its row and column (2·r1_i), S_xy its row (c1_i); likewise for y_j
    drop1 = _mmd2(s11 - 2 * r1, s22, s12 - c1, m - 1, n)
    drop2 = _mmd2(s11, s22 - 2 * r2, s12 - c2, m, n - 1)
    var = (m - 1) / m * (drop1 - drop1.mean()).pow(2).sum() + (n - 1) / n * (drop2 - drop2.mean()).pow(2).sum()
    return var.sqrt().item()


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
           "frechet_distance_stderr", "kernel_distance", "kernel_distance_stderr",
           "polynomial_kernel", "binomial_stderr", "mean_stderr", "heldout_denoising_loss",
           "heldout_denoising_errors", "heldout_loss_of", "fixed_noise", "HELDOUT_TIMESTEPS"]
