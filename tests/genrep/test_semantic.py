"""Semantic-driven generation (issues 21, 30): the module's zero init ("off", bitwise), the spatial
correction, the t-conditioned σ factor and its per-t weighting, REPA per position, where x_sem is
read in training, the posterior maths on a toy schedule, and the samplers (η = 0 and η = 1)."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from genrep.diffusion import condition, draw_denoising, make_scheduler, q_sample
from genrep.losses import generation_loss
from genrep.model import build_model, preset
from genrep.sampling import SAMPLER_ETA, ddim_sample, ddim_step, make_ddim
from genrep.semantic import (SemanticModulation, kl_scale, model_mean, posterior_mean, posterior_variance,
                             predict_x0, rep_align_loss, semantic_eps_fn, semantic_generation_loss,
                             semantic_input, semantic_step_fn, time_features, tokens, variance_kl,
                             variance_loss)

TINY = dict(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, head_hidden=16,
            sem_hidden=8, sem_width=8)
DIT = dict(image_size=8, dit_depth=2, dit_heads=2, dit_head_dim=8, sem_hidden=8, sem_width=8)
AC = make_scheduler(num_train_timesteps=100).alphas_cumprod
AC1000 = make_scheduler().alphas_cumprod
# toy schedule: α = (0.9, 0.8, 0.5) ⇒ ᾱ = (0.9, 0.72, 0.36)
TOY = torch.tensor([0.9, 0.72, 0.36])


def _model(name="digits16", semantic=True, **kw):
    return build_model(preset(name, **(TINY if name == "digits16" else DIT), semantic=semantic, **kw),
                       seed=0)


def _batch(model, n=4, seed=0, timesteps=AC.shape[0]):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x0 = torch.rand(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    draws = draw_denoising(n, tuple(x0.shape[1:]), timesteps, 0.2, g)
    return x0, labels, draws


def _perturb(module, scale=0.1, seed=1):
    """Non-zero weights everywhere (the zero-init layers included), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _modulation(sem: SemanticModulation):
    """The parameters of Δε and f_σ (all but the REPA projector)."""
    return [p for n, p in sem.named_parameters() if not n.startswith("projector.")]


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


@pytest.mark.parametrize("name, grid", [("digits16", 4), ("dit16", 4)])
def test_x_sem_is_the_map_the_head_pools(name, grid):
    model = _model(name)
    x0, _, _ = _batch(model)
    x_sem = model.semantic_map(x0)
    assert x_sem.shape == (4, model.backbone.feature_dim, grid, grid)
    assert torch.allclose(x_sem.mean(dim=(2, 3)), model.semantic_features(x0), atol=1e-6)
    if name == "digits16":  # the UNet's head reads the same tensor's mean: bitwise
        assert torch.equal(model.head(x_sem.mean(dim=(2, 3))), model.logits(x0))


@pytest.mark.parametrize("name", ["digits16", "dit16"])
def test_zero_initialised_module_is_off_bitwise(name):
    """A fresh module: ε + Δε is ε, the factor is 1 at every t, and the loss's MSE is L_gen, bitwise,
    whatever x_sem is read off."""
    model = _model(name)
    x0, labels, draws = _batch(model)
    x_t = q_sample(x0, draws.t, draws.noise, AC)
    x_sem = model.semantic_map(x0)
    assert torch.equal(model.eps_semantic(x_t, draws.t, labels, x_sem), model.eps(x_t, draws.t, labels))
    for t in (draws.t, torch.full((4,), 999)):
        assert torch.equal(model.semantic.sigma_factor(x_sem, t), torch.ones(4))
    want, _ = generation_loss(model.eps, x0, labels, draws, AC, model.null_class)
    for source in ("x0_hat", "x_t", "x0"):
        _, m = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, model.semantic_map,
                                        source=source)
        assert torch.equal(m["loss_gen"], want) and m["sigma_factor"] == 1
    with pytest.raises(ValueError, match="semantic=True"):
        _model(name, semantic=False).eps_semantic(x_t, draws.t, labels, x_sem)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_zero_initialised_module_leaves_the_samples_bitwise(eta):
    model = _model().eval()
    sem = semantic_step_fn(model, model, "x0_hat", make_ddim(3).alphas_cumprod)
    assert torch.equal(_sample(model, eta=eta, semantic=sem), _sample(model, eta=eta))


@pytest.mark.parametrize("name", ["digits16", "dit16"])
def test_eps_and_feature_map_is_one_forward_of_eps_and_the_map(name):
    model = _model(name)
    x0, labels, draws = _batch(model, n=3)
    x_t = q_sample(x0, draws.t, draws.noise, AC)
    with torch.no_grad():
        eps, h = model.eps_and_feature_map(x_t, draws.t, labels)
        assert torch.equal(eps, model.eps(x_t, draws.t, labels))
        assert torch.allclose(h, model.backbone.feature_map(x_t, draws.t, labels), atol=1e-6)
    assert h.shape == (3, model.backbone.feature_dim, 4, 4)


def test_dit_does_not_drop_labels_on_its_own():
    """diffusers' DiT drops labels in train mode (p = 0.1 per block); ours must not: ε in train
    mode is deterministic and equals eval mode's."""
    model = _model("dit16")
    x0, labels, draws = _batch(model, n=16)
    with torch.no_grad():
        a, b = model.eps(x0, draws.t, labels), model.eps(x0, draws.t, labels)
        assert torch.equal(a, b) and torch.equal(a, model.eval().eps(x0, draws.t, labels))


# ---------------------------------------------------------------- the spatial correction

def _module(seed=1):
    sem = SemanticModulation(channels=1, feature_dim=8, hidden=8, width=8)
    _perturb(sem, scale=0.3, seed=seed)
    return sem


def test_the_correction_is_local_in_x_sem():
    """Changing x_sem at one cell of its 4×4 grid changes Δε only near that cell's pixels: the
    bilinear resize (4 → 16) and two 3×3 convs reach 8 pixels from the corner at most."""
    sem, g = _module(), torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([300, 700])
    x_sem = torch.randn(2, 8, 4, 4, generator=g)
    moved = x_sem.clone()
    moved[:, :, 0, 0] += 3.0
    with torch.no_grad():
        diff = (sem.delta_eps(x_t, t, moved) - sem.delta_eps(x_t, t, x_sem)).abs()
    assert diff[..., :4, :4].min() > 0  # the corner's pixels move
    assert diff[..., 8:, :].max() == 0 and diff[..., :, 8:].max() == 0  # far ones do not


def test_a_structured_x_sem_corrects_positions_differently():
    """x_t = 0 everywhere: a spatially uniform x_sem (what a pooled vector broadcasts to) gives the
    same Δε at every interior pixel, the pooled reading's limit; an x_sem whose left and right
    halves differ gives Δε that differs between the halves."""
    sem = _module()
    x_t, t = torch.zeros(1, 1, 16, 16), torch.tensor([500])
    left_right = torch.cat([torch.ones(1, 8, 4, 2), -torch.ones(1, 8, 4, 2)], dim=3)
    uniform = left_right.mean(dim=(2, 3), keepdim=True).expand(1, 8, 4, 4)
    with torch.no_grad():
        flat, steer = (sem.delta_eps(x_t, t, m)[0, 0, 2:-2, 2:-2] for m in (uniform, left_right))
    assert torch.allclose(flat, flat[0, 0].expand_as(flat), atol=1e-6)
    assert (steer[:, :4].mean() - steer[:, -4:].mean()).abs() > 1e-2


def test_the_model_correction_reads_the_map_not_its_mean():
    model = _model()
    _perturb(model.semantic, scale=0.3)
    x0, labels, draws = _batch(model)
    x_t = q_sample(x0, draws.t, draws.noise, AC)
    x_sem = model.semantic_map(x0).detach()
    pooled = x_sem.mean(dim=(2, 3), keepdim=True).expand_as(x_sem)
    with torch.no_grad():
        assert not torch.allclose(model.eps_semantic(x_t, draws.t, labels, x_sem),
                                  model.eps_semantic(x_t, draws.t, labels, pooled), atol=1e-4)


# ---------------------------------------------------------------- the σ factor and its weighting

def test_factor_is_one_plus_tanh_and_stays_positive():
    sem = SemanticModulation(1, 4, 8, 4)
    _perturb(sem, scale=0.2)
    x_sem = torch.randn(64, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.arange(64) * 15
    f = sem.sigma_factor(x_sem, t)
    z = sem.sigma(torch.cat([x_sem.mean(dim=(2, 3)), time_features(t)], dim=-1)).squeeze(-1)
    assert torch.allclose(f, 1 + torch.tanh(z), atol=1e-6)
    assert bool(((f > 0) & (f < 2)).all()) and f.std() > 0
    with torch.no_grad():  # z = −20: 1 + tanh z is 0 in float32, 2·sigmoid(2z) is 2e^{−40}
        sem.sigma[2].weight.zero_(), sem.sigma[2].bias.fill_(-20.0)
    f = sem.sigma_factor(x_sem, t)
    assert bool((f > 0).all()) and torch.isfinite(variance_kl(
        torch.zeros(64, 1, 1, 1), torch.zeros(64, 1, 1, 1), torch.ones(64, dtype=torch.long),
        torch.zeros(64, 1, 1, 1), f, TOY)).all()


def test_sigma_factor_depends_on_t():
    """The same x_sem at different timesteps gets different factors (f_σ reads e(t)), and at a
    fixed t different x_sem get different ones; at init every factor is 1."""
    sem, g = _module(), torch.Generator().manual_seed(0)
    x_sem = torch.randn(1, 8, 4, 4, generator=g).expand(4, 8, 4, 4)
    t = torch.tensor([5, 200, 600, 990])
    f = sem.sigma_factor(x_sem, t)
    assert len(set(f.tolist())) == 4
    assert not torch.equal(sem.sigma_factor(torch.randn(4, 8, 4, 4, generator=g), t[:1].expand(4)),
                           sem.sigma_factor(x_sem, t[:1].expand(4)))
    fresh = SemanticModulation(1, 8, 8, 8)
    assert torch.equal(fresh.sigma_factor(x_sem, t), torch.ones(4))


def test_kl_scale_hand_values():
    # w_t = β_t/(α_t(1 − ᾱ_{t−1})): t = 1: 0.2/(0.8·0.1) = 2.5; t = 2: 0.5/(0.5·0.28); t = 0: 1
    got = kl_scale(TOY, torch.tensor([0, 1, 2]))
    assert torch.allclose(got, torch.tensor([1.0, 2.5, 1 / 0.28]), rtol=1e-6)
    w = kl_scale(AC1000, torch.arange(1, 1000))
    assert math.isclose(w[-1].item(), 999.0, rel_tol=1e-3) and w.median() < 0.01


def test_variance_loss_is_the_kl_in_noise_units():
    """"bound" is variance_kl (the pixel-space KL/D) computed from ε; "per_t" is it over w_t, the
    closed form ½[(log f² + 1/f² − 1)/w_t + mean(ε − ε_θ)²/f²]; t = 0 rows are 0."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    eps = noise + 0.3 * torch.randn(4, 1, 2, 2, generator=g)
    t, f = torch.tensor([1, 2, 2, 0]), torch.tensor([0.7, 1.0, 1.6, 1.2])
    x_t = q_sample(x0, t, noise, TOY)
    bound = variance_loss(noise, eps, t, f, TOY, "bound")
    assert torch.allclose(bound, variance_kl(x0, x_t, t, eps, f, TOY), rtol=1e-4) and bound[3] == 0
    w, r = kl_scale(TOY, t), ((eps - noise) ** 2).flatten(1).mean(1)
    want = 0.5 * ((torch.log(f ** 2) + 1 / f ** 2 - 1) / w + r / f ** 2)
    per_t = variance_loss(noise, eps, t, f, TOY, "per_t")
    assert torch.allclose(per_t[:3], want[:3], rtol=1e-6) and per_t[3] == 0
    assert torch.allclose(per_t * w, bound, rtol=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        variance_loss(noise, eps, t, f, TOY, "nope")


def test_per_t_weighting_spreads_the_gradient_over_t():
    """The same error (mean (ε − ε_θ)² = 1) at every t = 1..999 of the cosine schedule: the
    bound's weighting takes > 90% of the factor's gradient from t ≥ 990 (the issue's ~98%), the
    per-t one 10/999, as many as those t are; each t's gradient at f = 1 is then −r = −1."""
    t = torch.arange(1, 1000)
    noise = torch.randn(999, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = noise + torch.tensor([1.0, -1.0, -1.0, 1.0]).reshape(1, 1, 2, 2)  # (ε_θ − ε)² = 1
    share = {}
    for weighting in ("bound", "per_t"):
        f = torch.ones(999, requires_grad=True)
        variance_loss(noise, eps, t, f, AC1000, weighting).sum().backward()
        share[weighting] = (f.grad[t >= 990].abs().sum() / f.grad.abs().sum()).item()
    assert torch.allclose(f.grad, -torch.ones(999), rtol=1e-5)  # per_t: −r at every t
    assert share["bound"] > 0.9 and share["per_t"] == pytest.approx(10 / 999, rel=1e-4)


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


# ---------------------------------------------------------------- REPA per position

def test_rep_align_loss_hand_values():
    a = torch.tensor([[1.0, 2.0, 0.0]])
    assert rep_align_loss(a, 3 * a).abs() < 1e-6  # identical direction → 0
    assert torch.isclose(rep_align_loss(a, -a), torch.tensor(2.0))  # opposite → 2
    assert torch.isclose(rep_align_loss(a, torch.tensor([[-2.0, 1.0, 5.0]])), torch.tensor(1.0))
    two = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.isclose(rep_align_loss(two, torch.tensor([[1.0, 0.0], [0.0, 1.0]])), torch.tensor(0.5))


def test_rep_align_is_per_position():
    """Two positions holding orthogonal features in swapped places: the pooled vectors agree
    (a pooled loss of 0), the per-position loss is 1."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = torch.stack([a, b]).T.reshape(1, 2, 1, 2)  # [B, F, h, w]: position 0 holds a, 1 holds b
    x_sem = torch.stack([b, a]).T.reshape(1, 2, 1, 2)
    assert rep_align_loss(h.mean(dim=(2, 3)), x_sem.mean(dim=(2, 3))).abs() < 1e-6
    assert torch.isclose(rep_align_loss(tokens(h), tokens(x_sem)), torch.tensor(1.0))


def test_the_loss_aligns_the_denoisers_map_with_x_sem_per_position():
    model = _model()
    x0, labels, draws = _batch(model)
    _, m = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, model.semantic_map,
                                    source="x0", modulate=False)
    x_t = q_sample(x0, draws.t, draws.noise, AC)
    with torch.no_grad():
        _, h = model.eps_and_feature_map(x_t, draws.t, condition(labels, draws.drop, model.null_class))
        want = rep_align_loss(model.semantic.project(h), tokens(model.semantic_map(x0)))
    assert torch.isclose(m["loss_rep"], want) and m["loss_vlb"] == 0


# ---------------------------------------------------------------- where x_sem is read in training

@pytest.mark.parametrize("source", ["x0_hat", "x_t", "x0"])
def test_the_train_source_is_what_the_semantic_network_reads(source):
    """x_sem in training is read off x̂_0 = clip(predict_x0(x_t, t, sg(ε_θ))) of the loss's own
    forward (as the sampler reads it), or off x_t, or (the ablation) off the clean x_0."""
    model = _model()
    x0, labels, draws = _batch(model)
    seen = []

    def reader(x):
        seen.append(x.clone())
        return model.semantic_map(x)

    semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, reader, source=source)
    x_t = q_sample(x0, draws.t, draws.noise, AC)
    with torch.no_grad():
        eps = model.eps(x_t, draws.t, condition(labels, draws.drop, model.null_class))
    want = {"x0": x0, "x_t": x_t, "x0_hat": predict_x0(x_t, draws.t, eps, AC).clamp(-1, 1)}[source]
    assert len(seen) == 1 and torch.equal(seen[0], want)
    assert not seen[0].requires_grad


def test_semantic_input_refuses_unknown_sources():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="source"):
        semantic_input("nope", x, x, torch.tensor([1]), x, TOY)
    with pytest.raises(ValueError, match="source"):  # the sampler has no clean image
        semantic_input("x0", None, x, torch.tensor([1]), x, TOY)


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


def test_zero_init_modulated_loss_is_generation_loss_plus_the_variance_term():
    model = _model()
    x0, labels, draws = _batch(model)
    want, _ = generation_loss(model.eps, x0, labels, draws, AC, model.null_class)
    loss, m = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, model.semantic_map,
                                       vlb_weight=0.1, rep_weight=0.0)
    assert torch.equal(m["loss_gen"], want) and m["sigma_factor"] == 1
    # per t at f = 1: KL_t/(D·w_t) = ½·mean(ε − ε_θ)², so its batch mean is ½·L_gen
    assert torch.isclose(m["loss_vlb"], 0.5 * want, rtol=1e-4)
    assert torch.isclose(loss, want + 0.1 * m["loss_vlb"])


def test_gradients_reach_the_output_layers_and_not_the_semantic_network():
    model, sem_net = _model(), _model()
    x0, labels, draws = _batch(model)
    loss, m = semantic_generation_loss(model, x0, labels, draws, AC, model.null_class, sem_net.semantic_map)
    assert m["loss_rep"] > 0
    loss.backward()
    sem = model.semantic
    # zero-initialised outputs: they take gradient first; the layers before them once they moved
    for p in (sem.mean_out.weight, sem.mean_out.bias, sem.sigma[2].weight, sem.sigma[2].bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sem.projector.parameters())
    assert all(p.grad is None for p in sem_net.parameters())


def test_variance_term_sends_gradient_to_the_factor_only():
    model = _model()
    _perturb(model.semantic)
    x0, labels, draws = _batch(model)
    kw = dict(source="x0", rep_weight=0.0)
    args = (model, x0, labels, draws, AC, model.null_class, model.semantic_map)
    loss, _ = semantic_generation_loss(*args, **kw)
    mse, _ = semantic_generation_loss(*args, vlb_weight=0.0, **kw)
    sem = model.semantic
    mean_params = [sem.mean_in.weight, sem.mean_out.weight, sem.sem_proj.weight]
    grads = torch.autograd.grad(loss - mse, [*mean_params, *model.backbone.parameters()], allow_unused=True)
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


def test_ddpm_sampler_is_the_posterior_step_of_the_strided_chain():
    """SAMPLER_ETA["ddpm"] = 1: without the clip, DDIM's step is x_prev = μ̃(x̂_0, x_t) + √β̃·z with
    ᾱ_t, ᾱ_prev of the strided chain (Ho et al. 2020, eq. 7 on the respaced schedule)."""
    assert SAMPLER_ETA == {"ddim": 0.0, "ddpm": 1.0}
    ac = make_ddim(10).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x, noise = 0.3 * torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    eps = x + 0.1 * torch.randn(2, 1, 4, 4, generator=g)  # x̂_0 stays inside [−1, 1]: no clip
    x, noise, eps, ac = x.double(), noise.double(), eps.double(), ac.double()
    for t, prev in ((500, 400), (100, 0)):
        a_t, a_p = ac[t].double(), ac[prev].double()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        assert x0.abs().max() < 1
        mean = (a_p.sqrt() * (1 - a_t / a_p) * x0 + (a_t / a_p).sqrt() * (1 - a_p) * x) / (1 - a_t)
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        got = ddim_step(x, eps, t, prev, ac, SAMPLER_ETA["ddpm"], noise)
        assert torch.allclose(got, mean + var.sqrt() * noise, atol=1e-10)


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
    kw = {"generator": 0, "batch_size": 2, **kw}
    return ddim_sample(model.eps, labels, (1, 8, 8), steps=3, **kw)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_neutral_semantic_callable_leaves_samples(eta):
    model = _model(semantic=False).eval()

    def neutral(x_t, t, eps):
        return torch.zeros_like(x_t), torch.ones(x_t.shape[0])

    # bitwise: ddim_step does diffusers' operations in diffusers' order
    assert torch.equal(_sample(model, eta=eta, semantic=neutral), _sample(model, eta=eta))


def test_the_stochastic_sampler_is_seeded_and_differs_from_ddim():
    """η = 1 draws fresh noise every step: its samples differ from η = 0's from the same x_T,
    repeat bitwise for a seed (whatever the batch size), and differ between seeds."""
    model = _model(semantic=False).eval()
    ddpm = _sample(model, eta=1.0)
    assert not torch.allclose(ddpm, _sample(model, eta=0.0), atol=1e-3)
    assert torch.equal(ddpm, _sample(model, eta=1.0))
    assert torch.allclose(ddpm, _sample(model, eta=1.0, batch_size=3), atol=1e-5)  # same draws
    assert not torch.allclose(ddpm, _sample(model, eta=1.0, generator=1), atol=1e-3)


def test_semantic_changes_samples_and_the_factor_acts_only_with_noise():
    model = _model().eval()
    _perturb(model.semantic)
    sem = semantic_step_fn(model, model, "x0_hat", make_ddim(3).alphas_cumprod)
    plain = {eta: _sample(model, eta=eta) for eta in (0.0, 1.0)}
    assert not torch.allclose(_sample(model, semantic=sem), plain[0.0], atol=1e-4)
    # only f_σ perturbed (Δε back to 0): the model's own t-dependent factor, ≠ 1
    sigma_only = _model().eval()
    _perturb(sigma_only.semantic.sigma, scale=1.0)
    sem = semantic_step_fn(sigma_only, sigma_only, "x0_hat", make_ddim(3).alphas_cumprod)
    with torch.no_grad():
        x = torch.zeros(2, 1, 8, 8)
        f = sem(x, torch.tensor([666, 0]), x)[1]
    assert not torch.allclose(f, torch.ones(2), atol=1e-3)
    assert torch.equal(_sample(sigma_only, eta=0.0, semantic=sem), plain[0.0])
    assert not torch.allclose(_sample(sigma_only, eta=1.0, semantic=sem), plain[1.0], atol=1e-4)


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
        x_sem = model.semantic_map(x_in)
        assert torch.allclose(delta, model.semantic.delta_eps(x_t, t, x_sem), atol=1e-6)
        assert torch.allclose(factor, model.semantic.sigma_factor(x_sem, t), atol=1e-6)
        # the held-out loss's ε reads x_sem the same way, off its own base ε
        base = model.eps(x_t, t, torch.tensor([0, 1]))
        step = semantic_step_fn(model, model, source, ac)
        assert torch.allclose(semantic_eps_fn(model, model, source, ac)(x_t, t, torch.tensor([0, 1])),
                              base + step(x_t, t, base)[0], atol=1e-6)
    for bad in ("nope", "x0"):  # the sampler has no clean image
        with pytest.raises(ValueError, match="source"):
            semantic_step_fn(model, model, bad, ac)
