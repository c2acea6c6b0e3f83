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


def test_draws_for_a_global_batch_sliced_equal_a_rank_drawing_alone():
    """Rows [4:8) of the global draws are what rank 1 of 2 uses: same t, ε and dropout as the
    one-process run on the concatenated batch (the data-parallel exactness rests on this)."""
    from genrep.diffusion import draw_denoising

    whole = draw_denoising(8, (1, 2, 2), 100, 0.5, torch.Generator().manual_seed(3))
    again = draw_denoising(8, (1, 2, 2), 100, 0.5, torch.Generator().manual_seed(3)).rows(slice(4, 8))
    assert torch.equal(whole.t[4:], again.t) and torch.equal(whole.noise[4:], again.noise)
    assert torch.equal(whole.drop[4:], again.drop)
    assert whole.t.dtype == torch.long and whole.drop.dtype == torch.bool


def test_generation_loss_uses_the_null_label_where_dropped():
    from genrep.diffusion import DenoisingDraws
    from genrep.losses import generation_loss

    seen = {}

    def eps_fn(x_t, t, c):
        seen["c"] = c
        return torch.zeros_like(x_t)

    draws = DenoisingDraws(torch.tensor([1, 2]), torch.ones(2, 1, 2, 2), torch.tensor([True, False]))
    loss, _ = generation_loss(eps_fn, torch.zeros(2, 1, 2, 2), torch.tensor([4, 5]), draws,
                              make_scheduler(num_train_timesteps=10).alphas_cumprod, null_class=9)
    assert seen["c"].tolist() == [9, 5]
    assert loss.item() == pytest.approx(1.0)  # ε = 1 everywhere, prediction 0


def test_distillation_over_part_of_the_batch_is_averaged_over_the_whole_batch():
    """L = L_ce + β·τ²·(KL_0 + KL_1)/B for a teacher that scored the first 2 of B = 4 images."""
    z, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    q = torch.softmax(torch.randn(2, 3, generator=torch.Generator().manual_seed(2)), -1)
    tau, beta = 2.0, 0.5
    log_p = torch.log_softmax(z[:2] / tau, -1)
    kl = (q * (q.log() - log_p)).sum(-1)
    ce, _ = cross_entropy(z, y)
    loss, m = perception_loss(z, y, q, beta=beta, tau=tau)
    assert loss.item() == pytest.approx((ce + beta * tau**2 * kl.sum() / 4).item(), rel=1e-6)
    assert m["loss_kd"].item() == pytest.approx((tau**2 * kl.mean()).item(), rel=1e-6)


def test_no_teacher_rows_gives_no_distillation_but_a_differentiable_loss():
    z = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    loss, m = perception_loss(z, y, torch.zeros(0, 4), beta=1.0, use_ce=False)
    assert loss.item() == 0.0 and "loss_kd" not in m
    (g,) = torch.autograd.grad(loss, z)
    assert (g == 0).all()


def test_multitask_perception_loss_weights_the_tasks():
    from genrep.losses import multitask_perception_loss

    cls = (torch.tensor(2.0), {"loss_ce": torch.tensor(2.0), "loss_perc": torch.tensor(2.0)})
    seg = (torch.tensor(0.5), {"loss_seg": torch.tensor(0.5)})
    loss, m = multitask_perception_loss({"classify": cls, "segment": seg}, {"classify": 0.5, "segment": 4.0})
    assert float(loss) == 0.5 * 2.0 + 4.0 * 0.5 == float(m["loss_perc"])
    assert float(m["loss_cls"]) == 2.0 and float(m["loss_seg"]) == 0.5
    alone, m1 = multitask_perception_loss({"classify": cls}, {"classify": 1.0})
    assert float(alone) == 2.0 and "loss_cls" not in m1  # one task: perception_loss's own metrics
    with pytest.raises(ValueError, match="at least one task"):
        multitask_perception_loss({}, {})
