import math

import pytest
import torch

from genrep.diffusion import make_scheduler
from genrep.metrics import (binomial_stderr, expected_calibration_error, feature_stats,
                            fixed_noise, frechet_distance, frechet_distance_stderr,
                            heldout_denoising_errors, heldout_denoising_loss, mean_stderr, top1)
from genrep.sampling import ddim_sample, grid_png, sample_grid, sampling_evals, tile

AC = make_scheduler().alphas_cumprod


def toy_eps(x_t, t, c):
    """A nonlinear stand-in for ε_θ that depends on x_t, t and the class (∅ = 3 included)."""
    scale = 1.0 + t.float().view(-1, 1, 1, 1) / 1000
    return torch.tanh(scale * x_t + 0.2 * c.float().view(-1, 1, 1, 1))


def test_top1_logits_and_predictions():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 3, 0], [1, 0, 0]])
    assert top1(logits, labels) == 0.5
    assert top1(torch.tensor([0, 1, 2, 0]), labels) == 0.75


def test_ece_hand_computed():
    # 15 bins of width 1/15 ≈ 0.0667. Four predictions:
    #   conf 0.90 correct, conf 0.90 wrong  → bin (0.8667, 0.9333]: acc 0.5, conf 0.900, gap 0.400
    #   conf 0.58 correct, conf 0.55 wrong  → bin (0.5333, 0.6000]: acc 0.5, conf 0.565, gap 0.065
    # ECE = (2/4)·0.400 + (2/4)·0.065 = 0.2 + 0.0325 = 0.2325
    # (in separate bins they would add (0.42 + 0.55)/4 = 0.2425 instead of 0.0325)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.42, 0.58], [0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2325, abs=1e-9)


def test_ece_perfectly_calibrated_is_zero():
    # confidence 0.75 on every sample, right on exactly 3 of every 4: acc = conf = 0.75
    probs = torch.tensor([[0.75, 0.25]] * 8)
    labels = torch.tensor([0, 0, 0, 1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # one-hot and always right: conf 1 = acc 1
    assert expected_calibration_error(torch.eye(3), torch.arange(3)) == pytest.approx(0.0)


def test_frechet_identical_sets_is_zero():
    f = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_stats(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_diagonal():
    # diagonal Σ: Tr((Σ1Σ2)^{1/2}) = Σ_i √(s1_i s2_i), so
    # d² = ||μ1−μ2||² + Σ_i (√s1_i − √s2_i)² = (1+4+0) + (1−2)² + (2−3)² + (3−1)² = 5 + 6 = 11
    mu1, mu2 = torch.tensor([0.0, 0, 0]), torch.tensor([1.0, 2, 0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4, 9])), torch.diag(torch.tensor([4.0, 9, 1]))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(11.0, abs=1e-9)


def test_frechet_singular_covariances_are_finite():
    """Fewer samples than dimensions (rank-deficient Σ), as with 100 samples of 128-d features."""
    g = torch.Generator().manual_seed(1)
    a = feature_stats(torch.randn(10, 32, generator=g))
    b = feature_stats(torch.randn(10, 32, generator=g) + 1)
    d = frechet_distance(*a, *b)
    assert math.isfinite(d) and d > 0


def test_feature_stats_matches_torch_cov():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mu, sigma = feature_stats(f)
    torch.testing.assert_close(mu, f.mean(0))
    torch.testing.assert_close(sigma, torch.cov(f.T))


def test_ddim_deterministic_shape_and_range():
    labels = torch.tensor([0, 1, 2, 0])
    a = ddim_sample(toy_eps, labels, (1, 4, 4), steps=4, generator=7)
    b = ddim_sample(toy_eps, labels, (1, 4, 4), steps=4, generator=7, batch_size=3)
    c = ddim_sample(toy_eps, labels, (1, 4, 4), steps=4, generator=8)
    assert a.shape == (4, 1, 4, 4)
    assert a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)  # independent of batch_size: all noise drawn up front
    assert not torch.equal(a, c)


def test_ddim_cfg_path_runs_and_counts_two_evals():
    calls = []

    def counting_eps(x_t, t, c):
        calls.append(x_t.shape[0])
        return toy_eps(x_t, t, c)

    labels = torch.tensor([0, 1])
    x = ddim_sample(counting_eps, labels, (1, 4, 4), steps=3, guidance_scale=2.0, null_class=3,
                    generator=0)
    assert x.shape == (2, 1, 4, 4) and torch.isfinite(x).all()
    assert calls == [4, 4, 4]  # one batched forward of [cond; uncond] per step
    assert sum(calls) == sampling_evals(2, 3, 2.0)
    plain = ddim_sample(toy_eps, labels, (1, 4, 4), steps=3, generator=0)
    assert not torch.allclose(x, plain)
    with pytest.raises(ValueError):
        ddim_sample(toy_eps, labels, (1, 4, 4), steps=3, guidance_scale=2.0)


def test_sample_grid_and_png():
    import io

    from PIL import Image

    images, labels = sample_grid(toy_eps, 3, 2, (1, 4, 4), steps=2, generator=0)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and images.shape == (6, 1, 4, 4)
    img = Image.open(io.BytesIO(grid_png(images, 3)))  # the file is written by the harness
    assert img.size == (8, 12) and img.mode == "L"  # (width = 2 cols·4, height = 3 rows·4)


def test_tile_layout():
    imgs = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 3, 2, 2)
    grid = tile(imgs, rows=2)  # [[0, 1], [2, 3]]
    assert grid.shape == (4, 4, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 2, 0] == 1 and grid[2, 0, 0] == 2 and grid[3, 3, 0] == 3


def test_heldout_loss_fixed_draws():
    g = torch.Generator().manual_seed(0)
    x0, labels = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 0, 1])
    m1, per1 = heldout_denoising_loss(toy_eps, x0, labels, AC)
    m2, per2 = heldout_denoising_loss(toy_eps, x0, labels, AC, batch_size=2)
    assert m1 == pytest.approx(m2, rel=1e-6) and list(per1) == [50, 200, 500, 800]
    assert per1 == pytest.approx(per2, rel=1e-6)
    assert m1 == pytest.approx(sum(per1.values()) / 4)
    # image i's noise depends on (seed, i) only, not on how many images are scored
    torch.testing.assert_close(fixed_noise(5, (1, 4, 4), 0, 4)[:3], fixed_noise(3, (1, 4, 4), 0, 4))


def test_heldout_errors_per_image_average_to_the_loss():
    g = torch.Generator().manual_seed(0)
    x0, labels = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 0, 1])
    errors = heldout_denoising_errors(toy_eps, x0, labels, AC)
    mean, per_t = heldout_denoising_loss(toy_eps, x0, labels, AC)
    assert errors.shape == (4, 5)
    assert errors.mean(1).tolist() == pytest.approx(list(per_t.values()), rel=1e-6)
    assert errors.mean().item() == pytest.approx(mean, rel=1e-6)


def test_binomial_stderr_by_hand():
    assert binomial_stderr(0.8, 100) == pytest.approx(0.04)  # √(0.8·0.2/100) = √0.0016
    assert binomial_stderr(0.5, 4) == pytest.approx(0.25)  # √(0.25/4)
    assert binomial_stderr(1.0, 10) == 0.0 and math.isnan(binomial_stderr(0.5, 0))


def test_mean_stderr_by_hand():
    # values 1, 2, 3, 4: mean 2.5, s² = (2.25 + 0.25 + 0.25 + 2.25)/3 = 5/3, SE = √(5/3)/2
    assert mean_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(math.sqrt(5 / 3) / 2)
    assert math.isnan(mean_stderr(torch.tensor([1.0])))


def test_frechet_bootstrap_stderr_seeded_and_shrinks_with_n():
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g) + 1]
    big = [torch.randn(640, 3, generator=g), torch.randn(640, 3, generator=g) + 1]
    se = frechet_distance_stderr(*small, seed=1)
    assert se == frechet_distance_stderr(*small, seed=1) > 0  # the same resamples for a seed
    # d² ≈ 3 for a unit shift in 3-D; its spread falls as 1/√n: 16× the data, about ¼ the stderr
    assert 0.1 < frechet_distance_stderr(*big, seed=1) / se < 0.5
