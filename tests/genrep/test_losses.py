import math

import pytest
import torch

from genrep.diffusion import drop_labels, make_scheduler, q_sample
from genrep.losses import cross_entropy, denoising_loss, distillation_loss, perception_loss


def test_q_sample_hand_value():
    ac = torch.tensor([0.64, 0.36])  # √ᾱ = 0.8, 0.6; √(1−ᾱ) = 0.6, 0.8
    x0, noise = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), 1.0)
    x_t = q_sample(x0, torch.tensor([0, 1]), noise, ac)
    assert torch.allclose(x_t.flatten(), torch.tensor([0.8 * 2 + 0.6, 0.6 * 2 + 0.8]))


def test_make_scheduler_alphas_cumprod():
    ac = make_scheduler(num_train_timesteps=50).alphas_cumprod
    assert ac.shape == (50,) and bool((ac[1:] < ac[:-1]).all()) and 0 < ac[-1] < ac[0] < 1


def test_drop_labels_rate_and_extremes():
    labels, p, n = torch.zeros(20000, dtype=torch.long), 0.1, 20000
    dropped = (drop_labels(labels, p, 7, torch.Generator().manual_seed(0)) == 7).float().sum()
    assert abs(dropped.item() - n * p) < 4 * math.sqrt(n * p * (1 - p))
    assert (drop_labels(labels, 0.0, 7) == labels).all()
    assert (drop_labels(labels, 1.0, 7) == 7).all()


def test_denoising_loss_known_error_and_grad():
    ac = make_scheduler(num_train_timesteps=100).alphas_cumprod
    a = torch.tensor(0.5, requires_grad=True)

    def eps_fn(x_t, t, c):  # x0 = 0 ⇒ x_t/√(1−ᾱ_t) = ε exactly, so the error is a²
        return x_t / (1 - ac[t]).sqrt().view(-1, 1, 1, 1) + a

    x0, y = torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    loss, metrics = denoising_loss(eps_fn, x0, y, ac, 0.5, 3, torch.Generator().manual_seed(0))
    assert torch.isclose(loss, torch.tensor(0.25), atol=1e-4)
    loss.backward()
    assert torch.isclose(a.grad, torch.tensor(1.0), atol=1e-3)  # d(a²)/da
    assert not metrics["loss_gen"].requires_grad


def test_kl_zero_when_equal():
    z = torch.randn(5, 4)
    loss, _ = distillation_loss(z, torch.softmax(z / 2.0, -1), tau=2.0)
    assert abs(loss.item()) < 1e-5


def test_kl_two_class_hand_value():
    z = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    q = torch.tensor([[0.5, 0.5]])  # KL = ½ln(½/¼) + ½ln(½/¾) = ½ ln(4/3)
    loss, _ = distillation_loss(z, q, tau=1.0)
    assert math.isclose(loss.item(), 0.5 * math.log(4 / 3), rel_tol=1e-5)


def test_kl_tau_squared_scaling():
    z, q = torch.randn(3, 5), torch.softmax(torch.randn(3, 5), -1)
    base, _ = distillation_loss(z, q, tau=1.0)
    scaled, _ = distillation_loss(3.0 * z, q, tau=3.0)  # same softmax, times τ² = 9
    assert torch.isclose(scaled, 9.0 * base, rtol=1e-5)


def test_kl_zeros_in_teacher():
    z = torch.randn(2, 4, requires_grad=True)
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    loss, _ = distillation_loss(z, q, tau=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_perception_loss_combinations():
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    q = torch.softmax(torch.randn(3, 4), -1)
    ce, _ = cross_entropy(z, y)
    kd, _ = distillation_loss(z, q, 2.0)
    assert torch.isclose(perception_loss(z, y)[0], ce)
    assert torch.isclose(perception_loss(z, y, q, beta=0.5, tau=2.0)[0], ce + 0.5 * kd)
    assert torch.isclose(perception_loss(z, y, q, beta=0.5, tau=2.0, use_ce=False)[0], 0.5 * kd)
    with pytest.raises(ValueError):
        perception_loss(z, y, use_ce=False)
    with pytest.raises(ValueError):
        perception_loss(z, y, beta=1.0)
