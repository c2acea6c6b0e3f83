import math

import pytest
import torch

from genrep.diffusion import make_scheduler, q_sample
from genrep.posterior import (class_errors, draw_mc, elbo_weight, first_round_strata, fit_temperature,
                              log_prior, mc_posterior, posterior, shifted_errors, teacher_quality)

T = 100
AC = make_scheduler(num_train_timesteps=T).alphas_cumprod
A = torch.tensor([0.1, 1.0, 2.0, 3.0, 4.0, 5.0])  # per-class offset a_c; class 0 wins clearly


def known_eps_fn(x_t, t, c):
    """With x0 = 0, x_t/√(1−ᾱ_t) = ε, so ||ε − ε_θ||² (pixel mean) = a_c² exactly."""
    return x_t / (1 - AC[t]).sqrt().view(-1, 1, 1, 1) + A[c].view(-1, 1, 1, 1)


def random_eps_fn(x_t, t, c):
    """A nonlinear stand-in network depending on x_t, t and c."""
    scale = (1.0 + 0.1 * c.float() + t.float() / T).view(-1, 1, 1, 1)
    return torch.tanh(scale * x_t + 0.3 * c.float().view(-1, 1, 1, 1))


def reference_errors(eps_fn, x0, t, eps, classes):
    """Straightforward per-(image, class, draw) loop, the definition of e_c."""
    out = torch.zeros(x0.shape[0], len(classes))
    for b in range(x0.shape[0]):
        for i, c in enumerate(classes.tolist()):
            errs = []
            for k in range(t.shape[1]):
                tk, ek = t[b, k : k + 1], eps[b, k : k + 1]
                pred = eps_fn(q_sample(x0[b : b + 1], tk, ek, AC), tk, torch.tensor([c]))
                errs.append((ek - pred).pow(2).mean())
            out[b, i] = torch.stack(errs).mean()
    return out


def test_draw_mc_stratified_and_shapes():
    t, eps = draw_mc(4, 3, (1, 2, 2), T, torch.Generator().manual_seed(0))
    assert t.shape == (3, 4) and eps.shape == (3, 4, 1, 2, 2) and t.dtype == torch.long
    lo = torch.arange(4) * T // 4
    assert ((t >= lo) & (t < lo + T // 4)).all()  # one draw per stratum


def test_known_errors_posterior_and_zero_stderr():
    x0 = torch.zeros(2, 1, 3, 3)
    t, eps = draw_mc(5, 2, (1, 3, 3), T, torch.Generator().manual_seed(1))
    errors, stderr = class_errors(known_eps_fn, x0, t, eps, torch.arange(6), AC, chunk_size=7, scale="mean")
    assert torch.allclose(errors, (A**2).expand(2, -1), atol=1e-4)
    assert torch.allclose(stderr, torch.zeros(2, 6), atol=1e-4)
    q = posterior(errors, tau_mc=2.0)
    assert torch.allclose(q, torch.softmax(-(A**2) / 2.0, 0).expand(2, -1), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 7, 1000])
def test_chunked_equals_reference_loop(chunk_size):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 1, 3, 3, generator=g)
    t, eps = draw_mc(3, 2, (1, 3, 3), T, g)  # 2·4·3 = 24 triples; chunks 5, 7 split mid-class
    classes = torch.tensor([0, 2, 3, 5])
    errors, _ = class_errors(random_eps_fn, x0, t, eps, classes, AC, chunk_size=chunk_size, scale="mean")
    assert torch.allclose(errors, reference_errors(random_eps_fn, x0, t, eps, classes), atol=1e-6)


def test_per_image_candidate_classes():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 1, 3, 3, generator=g)
    t, eps = draw_mc(2, 2, (1, 3, 3), T, g)
    grid = torch.tensor([[0, 4], [5, 1]])
    errors, _ = class_errors(random_eps_fn, x0, t, eps, grid, AC, chunk_size=3, scale="mean")
    for b in range(2):
        ref = reference_errors(random_eps_fn, x0[b : b + 1], t[b : b + 1], eps[b : b + 1], grid[b])
        assert torch.allclose(errors[b], ref[0], atol=1e-6)


def test_pruning_evals_and_prediction():
    x0, k, keep, pk = torch.zeros(3, 1, 2, 2), 6, 2, 2
    full = mc_posterior(known_eps_fn, x0, 6, k, AC, generator=torch.Generator().manual_seed(4), scale="mean")
    pruned = mc_posterior(known_eps_fn, x0, 6, k, AC, chunk_size=5, prune_k=pk, prune_keep=keep,
                          generator=torch.Generator().manual_seed(4), scale="mean")
    assert full.evals == 3 * k * 6
    assert pruned.evals == 3 * (pk * 6 + (k - pk) * keep)
    assert torch.equal(pruned.kept.sort(1).values, torch.tensor([[0, 1]] * 3))
    # every draw's error is a_c² exactly: the shift is 0 and the pruned posterior is the full one
    assert torch.allclose(pruned.errors, (A**2).expand(3, -1), atol=1e-4)
    assert torch.allclose(pruned.probs, full.probs, atol=1e-5)
    assert (pruned.probs[:, 2:] > 0).all()
    assert torch.equal(pruned.pred, full.pred) and (full.pred == 0).all()
    assert torch.allclose(pruned.probs.sum(-1), torch.ones(3))


def test_shifted_errors_by_hand():
    first = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 2.0, 9.0]])
    kept = torch.tensor([[0, 1], [1, 2]])
    kept_full = torch.tensor([[1.2, 2.6], [1.5, 2.1]])  # shifts +0.2, +0.6 and +0.5, +0.1
    out = shifted_errors(first, kept, kept_full)
    assert torch.allclose(out, torch.tensor([[1.2, 2.6, 3.4, 4.4], [5.3, 1.5, 2.1, 9.3]]))


def test_pruned_errors_are_full_for_kept_and_shifted_first_round_for_pruned():
    g = torch.Generator().manual_seed(6)
    x0, k, pk, keep, n_cls = torch.randn(4, 1, 3, 3, generator=g), 4, 2, 2, 5
    full = mc_posterior(random_eps_fn, x0, n_cls, k, AC, generator=torch.Generator().manual_seed(7))
    pruned = mc_posterior(random_eps_fn, x0, n_cls, k, AC, prune_k=pk, prune_keep=keep,
                          generator=torch.Generator().manual_seed(7))  # the same K draws
    t, eps = draw_mc(k, 4, (1, 3, 3), T, torch.Generator().manual_seed(7))
    first = first_round_strata(k, pk)
    e1, _ = class_errors(random_eps_fn, x0, t[:, first], eps[:, first], torch.arange(n_cls), AC)
    kept = pruned.kept
    assert torch.equal(kept.sort(1).values, e1.topk(keep, 1, largest=False).indices.sort(1).values)
    assert torch.allclose(pruned.errors.gather(1, kept), full.errors.gather(1, kept), atol=1e-6)
    shift = (full.errors.gather(1, kept) - e1.gather(1, kept)).mean(1, keepdim=True)
    pruned_mask = torch.ones(4, n_cls, dtype=torch.bool).scatter(1, kept, False)
    assert torch.allclose(pruned.errors[pruned_mask], (e1 + shift)[pruned_mask], atol=1e-6)
    best_kept = kept.gather(1, full.errors.gather(1, kept).argmin(1, keepdim=True)).squeeze(1)
    assert torch.equal(pruned.pred, best_kept)


def test_tiny_unet_through_mc_posterior():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    num_classes = 3
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=num_classes + 1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    eps_fn = lambda x, t, c: unet(x, t, class_labels=c).sample
    x0 = torch.randn(2, 1, 8, 8)
    res = mc_posterior(eps_fn, x0, num_classes, k=2, alphas_cumprod=AC, chunk_size=5,
                       generator=torch.Generator().manual_seed(0))
    assert res.probs.shape == (2, num_classes) and res.evals == 2 * 2 * num_classes
    assert torch.allclose(res.probs.sum(-1), torch.ones(2), atol=1e-6)
    assert torch.isfinite(res.stderr).all() and res.pred.shape == (2,)


def test_timestep_weight_tensor_and_single_draw_stderr():
    x0 = torch.zeros(1, 1, 2, 2)
    t, eps = draw_mc(1, 1, (1, 2, 2), T, torch.Generator().manual_seed(5))
    w = torch.full((T,), 2.0)
    errors, stderr = class_errors(known_eps_fn, x0, t, eps, torch.arange(3), AC, weight=w, scale="mean")
    assert torch.allclose(errors, 2.0 * A[:3] ** 2, atol=1e-4)
    assert torch.isnan(stderr).all()  # one draw: the spread is not estimable


# --- the Bayes scale: pixel sum, ELBO weighting, prior ---------------------------------------------

def test_elbo_weight_hand_values():
    # β = (0.1, 0.2, 0.5): α = (0.9, 0.8, 0.5), ᾱ = (0.9, 0.72, 0.36); w = β/(2α(1−ᾱ))
    # t=0: 0.1/(2·0.9·0.1) = 1/1.8 = 0.5556; t=1: 0.2/(2·0.8·0.28) = 0.2/0.448 = 0.4464;
    # t=2: 0.5/(2·0.5·0.64) = 0.78125
    ac = torch.tensor([0.9, 0.72, 0.36], dtype=torch.float64)
    w = elbo_weight(ac)
    assert torch.allclose(w, torch.tensor([1 / 1.8, 0.2 / 0.448, 0.78125], dtype=torch.float64), atol=1e-12)
    # Ho et al. eq. 12's general form β²/(2σ²α(1−ᾱ)) at σ² = β gives the same numbers
    beta, sigma2 = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.5])
    assert torch.allclose(w, beta**2 / (2 * sigma2 * (1 - beta) * (1 - ac)), atol=1e-7)


def test_elbo_weight_recovers_the_schedule_betas():
    sched = make_scheduler(num_train_timesteps=T)
    beta = sched.betas.double()
    ref = beta / (2 * (1 - beta) * (1 - torch.cumprod(1 - beta, 0)))
    assert torch.allclose(elbo_weight(torch.cumprod(1 - beta, 0)), ref, rtol=1e-10)
    assert torch.allclose(elbo_weight(AC), ref, rtol=1e-4)  # from the float32 ᾱ the harness holds


def test_default_is_the_pixel_sum():
    x0 = torch.zeros(2, 1, 3, 3)  # D = 9 pixels
    t, eps = draw_mc(3, 2, (1, 3, 3), T, torch.Generator().manual_seed(1))
    summed, _ = class_errors(known_eps_fn, x0, t, eps, torch.arange(6), AC)
    mean, _ = class_errors(known_eps_fn, x0, t, eps, torch.arange(6), AC, scale="mean")
    assert torch.allclose(summed, 9 * (A**2).expand(2, -1), rtol=1e-4)
    assert torch.allclose(summed, 9 * mean, rtol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        class_errors(known_eps_fn, x0, t, eps, torch.arange(6), AC, scale="pixels")


def test_elbo_weighting_through_class_errors():
    x0 = torch.zeros(2, 1, 2, 2)  # D = 4; every draw's pixel-sum error is 4·a_c²
    t, eps = draw_mc(4, 2, (1, 2, 2), T, torch.Generator().manual_seed(2))
    errors, _ = class_errors(known_eps_fn, x0, t, eps, torch.arange(6), AC, weight="elbo")
    w = (T * elbo_weight(AC))[t].float().mean(1, keepdim=True)  # (1/K) Σ_k T·w(t_k), per image
    assert torch.allclose(errors, w * 4 * A**2, rtol=1e-4)


def test_log_prior_and_prior_in_mc_posterior():
    assert log_prior(None, 3) is None and log_prior("uniform", 3) is None
    assert torch.allclose(log_prior([1, 1, 2], 3), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64).log())
    for bad in ([1, 2], [1, -1, 1], [0, 0, 0], [1, float("nan"), 1]):
        with pytest.raises(ValueError, match="prior"):
            log_prior(bad, 3)
    # e_c = a_c² (pixel mean): 0.01 for class 0, 1 for class 1; a prior of 1000:1 for class 1 wins
    x0 = torch.zeros(2, 1, 2, 2)
    counts = torch.tensor([1.0, 1000.0, 1.0, 1.0, 1.0, 1.0])
    res = mc_posterior(known_eps_fn, x0, 6, 3, AC, generator=torch.Generator().manual_seed(3), scale="mean",
                       prior=counts)
    expected = torch.softmax(-(A**2) + (counts / counts.sum()).log().float(), 0)
    assert torch.allclose(res.probs, expected.expand(2, -1), atol=1e-5)
    assert (res.pred == 1).all()
    flat = mc_posterior(known_eps_fn, x0, 6, 3, AC, generator=torch.Generator().manual_seed(3), scale="mean")
    assert (flat.pred == 0).all()


# --- temperature calibration and the teacher's quality -------------------------------------------------

def synthetic(tau_star, n=20000, c=10, seed=0, prior=None):
    """log-likelihoods L ~ 4·N(0, 1) and labels y ~ softmax(L/τ* + log p)."""
    g = torch.Generator().manual_seed(seed)
    log_lik = 4 * torch.randn(n, c, generator=g, dtype=torch.float64)
    logits = log_lik / tau_star + (0 if prior is None else log_prior(prior, c))
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return log_lik, labels


def test_fit_temperature_recovers_a_known_tau():
    log_lik, labels = synthetic(3.0)
    tau = fit_temperature(log_lik, labels)
    assert tau == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(log_lik, labels) == tau  # deterministic
    assert fit_temperature(log_lik.float(), labels) == pytest.approx(tau, rel=1e-4)


def test_fit_temperature_with_a_class_prior():
    prior = torch.arange(1.0, 11.0)  # class frequencies 1..10
    log_lik, labels = synthetic(3.0, seed=1, prior=prior)
    assert fit_temperature(log_lik, labels, prior=prior) == pytest.approx(3.0, rel=0.05)


def test_fit_temperature_bad_input():
    log_lik, labels = synthetic(1.0, n=10)
    with pytest.raises(ValueError, match="log_lik"):
        fit_temperature(log_lik[0], labels)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(log_lik, labels, bounds=(0.0, 1.0))


def test_teacher_quality_hand_values():
    probs = torch.tensor([[0.7, 0.2, 0.1],  # y = 0: right, conf 0.7
                          [0.4, 0.6, 0.0],  # y = 1: right, conf 0.6
                          [0.1, 0.1, 0.8],  # y = 2: right, conf 0.8
                          [0.2, 0.3, 0.5]], dtype=torch.float64)  # y = 0: wrong, conf 0.5
    q = teacher_quality(probs, torch.tensor([0, 1, 2, 0]))
    assert q["top1"] == pytest.approx(0.75)
    # −(ln 0.7 + ln 0.6 + ln 0.8 + ln 0.2)/4 = (0.35667 + 0.51083 + 0.22314 + 1.60944)/4
    assert q["nll"] == pytest.approx(0.6750205079, abs=1e-9)
    # four confidences in four different bins: (|1−0.7| + |1−0.6| + |1−0.8| + |0−0.5|)/4
    assert q["ece"] == pytest.approx(0.35, abs=1e-9)
    assert q["mean_max_prob"] == pytest.approx(0.65)
    # H = 0.80182, 0.67301 (0·ln 0 = 0), 0.63903, 1.02965 nats → mean 0.78588
    assert q["mean_entropy"] == pytest.approx(0.7858787733, abs=1e-9)


def test_teacher_quality_of_the_uniform_teacher():
    q = teacher_quality(torch.full((6, 4), 0.25), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert q["nll"] == pytest.approx(math.log(4)) and q["mean_entropy"] == pytest.approx(math.log(4))
    assert q["mean_max_prob"] == pytest.approx(0.25)
    zero = teacher_quality(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))  # q(y|x) = 0: finite
    assert math.isfinite(zero["nll"]) and zero["nll"] > 700
