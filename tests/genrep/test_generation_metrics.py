"""The kernel distance (kid_ref) and the standard errors of the generation metrics: hand-computed
values on tiny inputs, the jackknife against its definition, and how both stderrs shrink with n."""
import math

import pytest
import torch

from genrep.metrics import (feature_stats, frechet_distance, frechet_distance_stderr,
                            kernel_distance, kernel_distance_stderr, polynomial_kernel)


def test_polynomial_kernel_by_hand():
    # d = 2: k(x, y) = (xᵀy/2 + 1)³; (1,1)·(1,1) = 2 → 2³ = 8; (1,1)·(2,0) = 2 → 8; (2,0)·(2,0) = 4 → 27
    a = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    assert polynomial_kernel(a, a).tolist() == [[8.0, 8.0], [8.0, 27.0]]


def test_kernel_distance_by_hand():
    # d = 1, k(a, b) = (ab + 1)³. X = {0, 1}, Y = {1, 2}:
    # within X (i ≠ j): k(0,1) = 1, twice / (2·1) = 1; within Y: k(1,2) = 27, twice / 2 = 27;
    # across: k(0,1) + k(0,2) + k(1,1) + k(1,2) = 1 + 1 + 8 + 27 = 37, 2·37/(2·2) = 18.5
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [2.0]])
    assert kernel_distance(x, y) == pytest.approx(1 + 27 - 18.5)  # 9.5


def test_kernel_distance_of_a_set_with_itself_is_negative_not_zero():
    # X = Y = {0, 1, 2}: within (i ≠ j) 2·(1 + 1 + 27)/6 = 29/3 each; across, the diagonal
    # k(0,0) + k(1,1) + k(2,2) = 1 + 8 + 125 joins the 58 off it: 192/9 = 64/3;
    # MMD²_u = 58/3 − 128/3 = −70/3: unbiased, so it may fall below 0
    x = torch.tensor([[0.0], [1.0], [2.0]])
    assert kernel_distance(x, x) == pytest.approx(-70 / 3)


def test_kernel_jackknife_is_its_definition():
    """The closed form from the kernel sums equals deleting each point and recomputing."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g) + 0.5
    drop_a = torch.tensor([kernel_distance(torch.cat([a[:i], a[i + 1:]]), b) for i in range(7)],
                          dtype=torch.float64)
    drop_b = torch.tensor([kernel_distance(a, torch.cat([b[:j], b[j + 1:]])) for j in range(5)],
                          dtype=torch.float64)
    var = (6 / 7 * (drop_a - drop_a.mean()).pow(2).sum()
           + 4 / 5 * (drop_b - drop_b.mean()).pow(2).sum())
    assert kernel_distance_stderr(a, b) == pytest.approx(var.sqrt().item(), rel=1e-9)
    assert math.isnan(kernel_distance_stderr(a[:2], b))  # a set of 2 leaves 1 point: no pairs


def test_kernel_distance_unbiased_where_frechet_is_not():
    """Two sets from one 16-d N(0, I), 40 points each, 30 times: the mean KID is 0 within 3
    standard errors of that mean, while the Fréchet distance sits far above its true 0 (its bias
    grows like D²/n: here 4.2 on average, each draw above 3, with a spread of 0.5)."""
    g = torch.Generator().manual_seed(1)
    kid, fd = [], []
    for _ in range(30):
        x, y = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
        kid.append(kernel_distance(x, y))
        fd.append(frechet_distance(*feature_stats(x), *feature_stats(y)))
    kid, fd = torch.tensor(kid), torch.tensor(fd)
    assert abs(kid.mean()) < 3 * kid.std() / math.sqrt(30)
    assert fd.mean() > 10 * fd.std() / math.sqrt(30) and fd.min() > 1.0


def test_frechet_stderr_is_over_the_samples_and_matches_the_delta_method():
    """500 held-out 'images' from N(0, I₄) and n samples from N(δe₁, I₄), δ = 2. To first order
    d² ≈ ‖μ̂₁ − μ̂₂‖², whose spread is 2δ·√(1/500 + 1/n) (the shift axis's mean difference has
    variance 1/500 + 1/n): 0.593 at n = 50, 0.253 at n = 500. The bootstrap (B = 50) must land
    within 40% of each and shrink by about their ratio, 2.3."""
    g = torch.Generator().manual_seed(0)
    delta, real = 2.0, torch.randn(500, 4, generator=g)
    shift = torch.tensor([delta, 0.0, 0.0, 0.0])
    se = {}
    for n in (50, 500):
        fake = torch.randn(n, 4, generator=g) + shift
        se[n] = frechet_distance_stderr(real, fake, seed=0)
        assert se[n] == pytest.approx(2 * delta * math.sqrt(1 / 500 + 1 / n), rel=0.4), n
    assert 1.5 < se[50] / se[500] < 3.5


def test_kernel_stderr_shrinks_like_one_over_root_n():
    """The same two Gaussians, n points on each side: the jackknife stderr falls by about √10
    from n = 50 to 500 (a non-degenerate U-statistic: variance ∝ 1/n)."""
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([2.0, 0.0, 0.0, 0.0])
    se = {n: kernel_distance_stderr(torch.randn(n, 4, generator=g),
                                    torch.randn(n, 4, generator=g) + shift) for n in (50, 500)}
    assert 2.0 < se[50] / se[500] < 5.0
