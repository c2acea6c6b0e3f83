"""Semantic-driven generation (issue 21): the module's zero init, the posterior maths on a toy
schedule, the variance and alignment losses, their gradients, and the sampler's semantic path."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from genrep.diffusion import draw_denoising, make_scheduler, q_sample
from genrep.losses import generation_loss
from genrep.model import build_model, preset
from genrep.sampling import ddim_sample, ddim_step, make_ddim
from genrep.semantic import (SemanticModulation, model_mean, posterior_mean, posterior_variance,
                             rep_align_loss, semantic_generation_loss, semantic_step_fn,
                             variance_kl)

TINY = dict(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, head_hidden=16,
            sem_hidden=8)
DIT = dict(image_size=8, dit_depth=2, dit_heads=2, dit_head_dim=8, sem_hidden=8)
AC = make_scheduler(num_train_timesteps=100).alphas_cumprod
# toy schedule: α = (0.9, 0.8, 0.5) ⇒ ᾱ = (0.9, 0.72, 0.36)
TOY = torch.tensor([0.9, 0.72, 0.36])


def _model(name="digits16", semantic=True, **kw):
    return build_model(preset(name, **(TINY if name == "digits16" else DIT), semantic=semantic, **kw),
                       seed=0)


def _batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x0 = torch.rand(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    draws = draw_denoising(n, tuple(x0.shape[1:]), AC.shape[0], 0.2, g)
    return x0, labels, draws


def _perturb(module, scale=0.1, seed=1):
    """Non-zero weights everywhere (the zero-init layers included), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- model interface and zero init

def test_semantic_module_leaves_seeded_init_unchanged():
    off, on = _model(semantic=False), _model(semantic=True)
    assert off.semantic is None and isinstance(on.semantic, SemanticModulation)
    a, b = off.state_dict(), on.state_dict()
    assert set(b) - set(a) == {k for k in b if k.startswith("semantic.")}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shared_parameters_put_the_semantic_module_after_the_backbone():
    model = _model()
    shared, heads = model.shared_parameters(), model.head_parameters()
    n_bb = len(list(model.backbone.parameters()))
    assert [id(p) for p in shared[n_bb:]] == [id(p) for p in model.semantic.parameters()]
    assert [id(p) for p in heads] == [id(p) for p in model.head.parameters()]


def test_zero_init_eps_semantic_and_factor():
    model = _model()
    x0, labels, draws = _batch(model)
    x_sem = model.semantic_features(x0)
    assert x_sem.shape == (4, model.backbone.feature_dim)
    assert torch.equal(model.head(x_sem), model.logits(x0))
    x_t = q_sample(x0, draws.t, draws.noise, AC)
    assert torch.equal(model.eps_semantic(x_t, draws.t, labels, x_sem), model.eps(x_t, draws.t, labels))
    assert torch.equal(model.semantic.sigma_factor(x_sem), torch.ones(4))
    with pytest.raises(ValueError, match="semantic=True"):
        _model(semantic=False).eps_semantic(x_t, draws.t, labels, x_sem)


@pytest.mark.parametrize("name", ["digits16", "dit16"])
def test_eps_and_features_is_one_forward_of_eps_and_features(name):
    model = _model(name)
    x0, labels, draws = _batch(model, n=3)
    x_t = q_sample(x0, draws.t, draws.noise, AC)
    with torch.no_grad():
        eps, pooled = model.eps_and_features(x_t, draws.t, labels)
        assert torch.equal(eps, model.eps(x_t, draws.t, labels))
        assert torch.allclose(pooled, model.backbone.features(x_t, draws.t, labels), atol=1e-6)
    assert pooled.shape == (3, model.backbone.feature_dim)


def test_factor_is_one_plus_tanh_and_stays_positive():
    sem = SemanticModulation(1, 4, 8)
    _perturb(sem, scale=1.0)
    x_sem = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    f = sem.sigma_factor(x_sem)
    assert torch.allclose(f, 1 + torch.tanh(sem.sigma(x_sem).squeeze(-1)), atol=1e-6)
    assert bool(((f > 0) & (f < 2)).all()) and f.std() > 0
    with torch.no_grad():  # z = −20: 1 + tanh z is 0 in float32, 2·sigmoid(2z) is 2e^{−40}
        sem.sigma[2].weight.zero_(), sem.sigma[2].bias.fill_(-20.0)
    f = sem.sigma_factor(x_sem)
    assert bool((f > 0).all()) and torch.isfinite(variance_kl(
        torch.zeros(64, 1, 1, 1), torch.zeros(64, 1, 1, 1), torch.ones(64, dtype=torch.long),
        torch.zeros(64, 1, 1, 1), f, TOY)).all()


def test_dit_does_not_drop_labels_on_its_own():
    """diffusers' DiT drops labels in train mode (p = 0.1 per block); ours must not: ε in train
    mode is deterministic and equals eval mode's."""
    model = _model("dit16")
    x0, labels, draws = _batch(model, n=16)
    with torch.no_grad():
        a, b = model.eps(x0, draws.t, labels), model.eps(x0, draws.t, labels)
        assert torch.equal(a, b) and torch.equal(a, model.eval().eps(x0, draws.t, labels))


# ---------------------------------------------------------------- posterior maths on a toy schedule

def test_posterior_variance_hand_values():
    # β = (0.1, 0.2, 0.5); β̃_1 = 0.2·0.1/0.28, β̃_2 = 0.5·0.28/0.64, β̃_0 = 0 (ᾱ_{−1} = 1)
    got = posterior_variance(TOY, torch.tensor([0, 1, 2]))
    assert torch.allclose(got, torch.tensor([0.0, 0.02 / 0.28, 0.14 / 0.64]), atol=1e-7)
    assert got[0] == 0


def test_posterior_and_model_mean_hand_values():
    x0, x_t, eps = torch.full((1, 1), 1.0), torch.full((1, 1), 2.0), torch.full((1, 1), 0.5)
    t = torch.tensor([1])  # ᾱ_t = 0.72, ᾱ_{t−1} = 0.9, α_t = 0.8, β_t = 0.2
    mu_q = math.sqrt(0.9) * 0.2 / 0.28 * 1.0 + math.sqrt(0.8) * 0.1 / 0.28 * 2.0
    mu_p = (2.0 - 0.2 / math.sqrt(0.28) * 0.5) / math.sqrt(0.8)
    assert math.isclose(posterior_mean(x0, x_t, t, TOY).item(), mu_q, rel_tol=1e-6)
    assert math.isclose(model_mean(x_t, eps, t, TOY).item(), mu_p, rel_tol=1e-6)
    # t = 0: μ̃_0 = x_0 (coefficient β_0/(1−ᾱ_0) = 1, and 1 − ᾱ_{−1} = 0)
    assert math.isclose(posterior_mean(x0, x_t, torch.tensor([0]), TOY).item(), 1.0, rel_tol=1e-6)


def test_model_mean_with_the_true_noise_is_the_posterior_mean():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    t = torch.tensor([0, 1, 2])
    x_t = q_sample(x0, t, noise, TOY)
    assert torch.allclose(model_mean(x_t, noise, t, TOY), posterior_mean(x0, x_t, t, TOY), atol=1e-5)


def test_variance_kl_hand_values():
    g = torch.Generator().manual_seed(0)
    x0, x_t, eps = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 2])
    d2 = (posterior_mean(x0, x_t, t, TOY) - model_mean(x_t, eps, t, TOY)).flatten(1) ** 2
    var = posterior_variance(TOY, t)
    # factor 1: ½·(μ̃ − μ_θ)²/β̃_t, mean over dimensions; the t = 0 row is left out (0)
    got = variance_kl(x0, x_t, t, eps, torch.ones(3), TOY)
    assert got[0] == 0
    assert torch.allclose(got[1:], 0.5 * (d2[1:] / var[1:, None]).mean(1), rtol=1e-5)
    # factor 2: ½[log 4 + (β̃ + d²)/(4β̃) − 1]
    got2 = variance_kl(x0, x_t, t, eps, torch.full((3,), 2.0), TOY)
    want2 = 0.5 * (math.log(4) + (var[1:, None] + d2[1:]) / (4 * var[1:, None]) - 1).mean(1)
    assert torch.allclose(got2[1:], want2, rtol=1e-5) and got2[0] == 0


def test_rep_align_loss_hand_values():
    a = torch.tensor([[1.0, 2.0, 0.0]])
    assert rep_align_loss(a, 3 * a).abs() < 1e-6  # identical direction → 0
    assert torch.isclose(rep_align_loss(a, -a), torch.tensor(2.0))  # opposite → 2
    assert torch.isclose(rep_align_loss(a, torch.tensor([[-2.0, 1.0, 5.0]])), torch.tensor(1.0))
    two = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.isclose(rep_align_loss(two, torch.tensor([[1.0, 0.0], [0.0, 1.0]])), torch.tensor(0.5))


# ---------------------------------------------------------------- the training loss

def test_loss_without_semantic_terms_is_generation_loss_bitwise():
    for semantic in (False, True):
        model = _model(semantic=semantic)
        x0, labels, draws = _batch(model)
        want, wm = generation_loss(model.eps, x0, labels, draws, AC, model.null_class)
        got, m = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, None,
                                          modulate=False, rep_weight=0.0)
        assert torch.equal(got, want) and torch.equal(m["loss_gen"], wm["loss_gen"])
        assert m["loss_vlb"] == 0 and m["loss_rep"] == 0 and m["sigma_factor"] == 1


def test_zero_init_modulated_loss_gen_is_generation_loss():
    model = _model()
    x0, labels, draws = _batch(model)
    x_sem = model.semantic_features(x0).detach()
    want, _ = generation_loss(model.eps, x0, labels, draws, AC, model.null_class)
    loss, m = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, x_sem,
                                       vlb_weight=0.1, rep_weight=0.0)
    assert torch.equal(m["loss_gen"], want) and m["sigma_factor"] == 1
    assert m["loss_vlb"] > 0 and torch.isclose(loss, want + 0.1 * m["loss_vlb"])


def test_gradients_reach_the_zero_init_layers_and_not_x_sem():
    model = _model()
    x0, labels, draws = _batch(model)
    x_sem = model.semantic_features(x0).detach().requires_grad_(True)
    loss, m = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, x_sem)
    assert m["loss_rep"] > 0
    loss.backward()
    sem = model.semantic
    for p in (sem.mean.weight, sem.mean.bias, sem.sigma[2].weight, sem.sigma[2].bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sem.projector.parameters())
    assert x_sem.grad is None


def test_variance_term_sends_gradient_to_the_factor_only():
    model = _model()
    _perturb(model.semantic)
    x0, labels, draws = _batch(model)
    x_sem = model.semantic_features(x0).detach()
    loss, _ = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, x_sem,
                                       rep_weight=0.0)
    mse, _ = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, x_sem,
                                      vlb_weight=0.0, rep_weight=0.0)
    grads = torch.autograd.grad(loss - mse, [model.semantic.mean.weight, *model.backbone.parameters()],
                                allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)


def test_variance_kl_is_a_function_of_the_factor_only():
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(2, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    eps = torch.randn(2, 1, 2, 2, generator=g).requires_grad_(True)
    factor = torch.tensor([0.7, 1.3], requires_grad=True)
    variance_kl(x0, x_t, torch.tensor([1, 2]), eps, factor, TOY).sum().backward()
    assert eps.grad is None and bool((factor.grad != 0).all())


def test_semantic_loss_needs_the_module_and_x_sem():
    model = _model(semantic=False)
    x0, labels, draws = _batch(model)
    with pytest.raises(ValueError, match="semantic=True"):
        semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, None)


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_equals_diffusers(eta):
    sched = make_ddim(10)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (2 * torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    for t in sched.timesteps:
        prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        want = sched.step(eps, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        got = ddim_step(x, eps, int(t), prev, sched.alphas_cumprod, eta, noise if eta else None)
        assert torch.allclose(got, want, atol=1e-6)
    assert isinstance(sched, DDIMScheduler)


def test_ddim_step_factor_scales_the_noise():
    sched = make_ddim(10)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    ones, half = torch.ones(2), torch.full((2,), 0.5)
    assert torch.equal(ddim_step(x, eps, 500, 400, sched.alphas_cumprod, 0.0, None, half),
                       ddim_step(x, eps, 500, 400, sched.alphas_cumprod, 0.0, None))
    base = ddim_step(x, eps, 500, 400, sched.alphas_cumprod, 1.0, noise * 0, ones)
    a_t, a_p = sched.alphas_cumprod[500], sched.alphas_cumprod[400]
    sigma = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    got = ddim_step(x, eps, 500, 400, sched.alphas_cumprod, 1.0, noise, half) - \
        ddim_step(x, eps, 500, 400, sched.alphas_cumprod, 1.0, noise * 0, half)
    assert torch.allclose(got, 0.5 * sigma * noise, atol=1e-6)
    assert not torch.equal(base, ddim_step(x, eps, 500, 400, sched.alphas_cumprod, 1.0, noise * 0, half))


def _sample(model, **kw):
    labels = torch.tensor([0, 1, 2])
    return ddim_sample(model.eps, labels, (1, 8, 8), steps=3, generator=0, batch_size=2, **kw)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_neutral_semantic_callable_leaves_samples(eta):
    model = _model(semantic=False).eval()

    def neutral(x_t, t, eps):
        return torch.zeros_like(x_t), torch.ones(x_t.shape[0])

    # bitwise: ddim_step does diffusers' operations in diffusers' order
    assert torch.equal(_sample(model, eta=eta, semantic=neutral), _sample(model, eta=eta))


def test_semantic_changes_samples_and_factor_acts_only_with_noise():
    model = _model().eval()
    _perturb(model.semantic)
    sem = semantic_step_fn(model, model, "x0_hat", make_ddim(3).alphas_cumprod)
    plain = {eta: _sample(model, eta=eta) for eta in (0.0, 1.0)}
    assert not torch.allclose(_sample(model, semantic=sem), plain[0.0], atol=1e-4)

    def factor_only(x_t, t, eps):  # no mean correction, only the σ factor
        return torch.zeros_like(x_t), torch.full((x_t.shape[0],), 1.5)

    assert torch.allclose(_sample(model, eta=0.0, semantic=factor_only), plain[0.0], atol=1e-6)
    assert not torch.allclose(_sample(model, eta=1.0, semantic=factor_only), plain[1.0], atol=1e-4)


@pytest.mark.parametrize("source", ["x0_hat", "x_t"])
def test_semantic_step_fn_reads_the_source(source):
    model = _model().eval()
    _perturb(model.semantic)
    ac = make_ddim(3).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t = torch.full((2,), 500)
    with torch.no_grad():
        delta, factor = semantic_step_fn(model, model, source, ac)(x_t, t, eps)
        a = ac[500]
        x_in = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1) if source == "x0_hat" else x_t
        x_sem = model.semantic_features(x_in)
        assert torch.allclose(delta, model.semantic.delta_eps(x_t, x_sem), atol=1e-6)
        assert torch.allclose(factor, model.semantic.sigma_factor(x_sem), atol=1e-6)
    with pytest.raises(ValueError, match="source"):
        semantic_step_fn(model, model, "nope", ac)
