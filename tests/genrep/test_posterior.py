import pytest
import torch

from genrep.diffusion import make_scheduler, q_sample
from genrep.posterior import (class_errors, draw_mc, first_round_strata, mc_posterior, posterior,
                              shifted_errors)

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
    errors, stderr = class_errors(known_eps_fn, x0, t, eps, torch.arange(6), AC, chunk_size=7)
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
    errors, _ = class_errors(random_eps_fn, x0, t, eps, classes, AC, chunk_size=chunk_size)
    assert torch.allclose(errors, reference_errors(random_eps_fn, x0, t, eps, classes), atol=1e-6)


def test_per_image_candidate_classes():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 1, 3, 3, generator=g)
    t, eps = draw_mc(2, 2, (1, 3, 3), T, g)
    grid = torch.tensor([[0, 4], [5, 1]])
    errors, _ = class_errors(random_eps_fn, x0, t, eps, grid, AC, chunk_size=3)
    for b in range(2):
        ref = reference_errors(random_eps_fn, x0[b : b + 1], t[b : b + 1], eps[b : b + 1], grid[b])
        assert torch.allclose(errors[b], ref[0], atol=1e-6)


def test_pruning_evals_and_prediction():
    x0, k, keep, pk = torch.zeros(3, 1, 2, 2), 6, 2, 2
    full = mc_posterior(known_eps_fn, x0, 6, k, AC, generator=torch.Generator().manual_seed(4))
    pruned = mc_posterior(known_eps_fn, x0, 6, k, AC, chunk_size=5, prune_k=pk, prune_keep=keep,
                          generator=torch.Generator().manual_seed(4))
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
    errors, stderr = class_errors(known_eps_fn, x0, t, eps, torch.arange(3), AC, weight=w)
    assert torch.allclose(errors, 2.0 * A[:3] ** 2, atol=1e-4)
    assert torch.isnan(stderr).all()  # one draw: the spread is not estimable
