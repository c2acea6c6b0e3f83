import math

import pytest
import torch
import torch.nn.functional as F

from genrep.diffusion import make_scheduler
from genrep.model import ModelConfig, build_model
from genrep.reference import accuracy, predict, train_reference
from harness.evaluate import evaluate, reference_classifier

KEYS = {"head_acc", "head_ece", "mc_acc", "mc_evals_per_image", "heldout_loss", "fd_ref",
        "kid_ref", "sample_acc", "guidance_scale", "eval_seconds", "eval_network_evals"}


def toy_dataset(n_per_class: int = 12, size: int = 8, seed: int = 0):
    """3 classes of noisy constant-ish images: class c has mean −0.6 + 0.6·c, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    noise = 0.15 * torch.randn(len(labels), 1, size, size, generator=g)
    x = (-0.6 + 0.6 * labels.float()).view(-1, 1, 1, 1) + noise
    return x.clamp(-1, 1), labels


def test_reference_classifier_trained_once_then_cached(tmp_path):
    x, y = toy_dataset()
    vx, vy = toy_dataset(4, seed=1)
    kw = dict(epochs=3, seed=0, batch_size=16)
    net1, info1 = reference_classifier(tmp_path, "abc123", x, y, vx, vy, **kw)
    net2, info2 = reference_classifier(tmp_path, "abc123", x, y, vx, vy, **kw)
    assert info1["trained"] and not info2["trained"]
    assert info1["ref_val_acc"] == info2["ref_val_acc"] > 0.9
    assert torch.equal(predict(net1, vx), predict(net2, vx))
    torch.testing.assert_close(net1.features(vx), net2.features(vx))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".pt"]  # no temp files left
    _, info3 = reference_classifier(tmp_path, "other-key", x, y, vx, vy, **kw)
    assert info3["trained"]


def test_train_reference_deterministic():
    x, y = toy_dataset()
    a, b = (train_reference(x, y, epochs=2, seed=3, batch_size=16) for _ in range(2))
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def digits16():
    """sklearn digits, 8×8 → 16×16 (bilinear), in [-1, 1]; 1,437 train / 360 val by a seeded split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1437]], y[perm[:1437]], x[perm[1437:]], y[perm[1437:]]


@pytest.mark.slow
def test_reference_on_digits():
    tx, ty, vx, vy = digits16()
    net = train_reference(tx, ty, seed=0)
    assert accuracy(net, vx, vy) > 0.9


def tiny_model(seed: int):
    cfg = ModelConfig(block_out_channels=(8, 16), norm_num_groups=4, image_size=8, channels=1,
                      num_classes=3)
    return build_model(cfg, seed=seed)


@pytest.mark.parametrize("separate, guidance", [(False, 1.0), (True, 2.0)])
def test_evaluate_tiny_model(tmp_path, separate, guidance):
    x, y = toy_dataset()
    vx, vy = toy_dataset(4, seed=1)
    ref = train_reference(x, y, epochs=2, seed=0, batch_size=16)
    gen = tiny_model(0)
    perc = tiny_model(1) if separate else gen
    gen.train()
    grid = tmp_path / "samples.png"
    out = evaluate(perc, gen, vx, vy, ref, mc_k=2, mc_images=4, sample_per_class=2, ddim_steps=3,
                   guidance_scale=guidance, seed=0, alphas_cumprod=make_scheduler().alphas_cumprod,
                   grid_path=grid)
    assert KEYS <= set(out) and all(math.isfinite(v) for v in out.values())
    assert grid.exists() and grid.stat().st_size > 0
    assert gen.training  # the caller's mode is restored
    assert out["mc_evals_per_image"] == 2 * 3  # K·C
    # MC 4·2·3 + sampling 6·3·(2 with CFG) + held-out 12·4 timesteps
    assert out["eval_network_evals"] == 24 + 6 * 3 * (2 if guidance != 1 else 1) + 12 * 4
    assert 0 <= out["head_ece"] <= 1 and 0 <= out["sample_acc"] <= 1
    assert out["guidance_scale"] == guidance  # a fixed scale is reported as it was set


class FixedHead(torch.nn.Module):
    """A 'model' whose head returns given logits, one row per image (the image's first pixel
    indexes the row)."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.nn.Parameter(logits, requires_grad=False)

    def logits(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def test_head_accuracy_carries_its_binomial_stderr():
    from harness.evaluate import head_metrics

    # predictions 0, 1, 1, 2 against labels 0, 1, 2, 2: 3 of 4 right
    logits = torch.eye(3)[[0, 1, 1, 2]] * 5
    out = head_metrics(FixedHead(logits), torch.arange(4.0).view(4, 1, 1, 1), torch.tensor([0, 1, 2, 2]))
    assert out["head_acc"] == 0.75
    assert out["head_acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))  # 0.2165


def test_evaluation_reports_stderrs(tmp_path):
    x, y = toy_dataset()
    vx, vy = toy_dataset(4, seed=1)  # 12 held-out images
    ref = train_reference(x, y, epochs=2, seed=0, batch_size=16)
    out = evaluate(tiny_model(0), tiny_model(0), vx, vy, ref, mc_k=2, mc_images=4,
                   sample_per_class=2, ddim_steps=3, seed=0,
                   alphas_cumprod=make_scheduler().alphas_cumprod, grid_path=tmp_path / "samples.png")
    binomial = {"head_acc": 12, "mc_acc": 4, "sample_acc": 6}  # images or samples scored
    for m, n in binomial.items():
        assert out[f"{m}_stderr"] == pytest.approx(math.sqrt(out[m] * (1 - out[m]) / n)), m
    for m in ("heldout_loss", "heldout_loss_t50", "heldout_loss_t800", "fd_ref", "kid_ref"):
        assert math.isfinite(out[f"{m}_stderr"]) and out[f"{m}_stderr"] > 0, m
    assert "head_ece_stderr" not in out
    assert [p.name for p in tmp_path.iterdir()] == ["samples.png"]  # written atomically


def test_heldout_stderr_is_the_spread_over_images():
    from harness.evaluate import heldout_metrics

    class ConstantEps(torch.nn.Module):  # ε_θ ≡ 0: an image's error is the mean of ε² at each t
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def eps(self, x, t, c):
            return torch.zeros_like(x)

    from genrep.metrics import fixed_noise

    x, y = toy_dataset(2)  # 6 images
    out, evals = heldout_metrics(ConstantEps(), x, y, make_scheduler().alphas_cumprod)
    per_image = fixed_noise(6, x.shape[1:], 0, 4).pow(2).flatten(2).mean(2).mean(1)  # [6]
    assert evals == 6 * 4
    assert out["heldout_loss"] == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert out["heldout_loss_stderr"] == pytest.approx(per_image.std().item() / math.sqrt(6), rel=1e-5)


def test_mc_images_all_scores_every_held_out_image():
    x, y = toy_dataset()
    vx, vy = toy_dataset(4, seed=1)  # 12 held-out images
    ref = train_reference(x, y, epochs=2, seed=0, batch_size=16)
    out = evaluate(tiny_model(0), tiny_model(0), vx, vy, ref, mc_k=2, mc_images="all",
                   sample_per_class=2, ddim_steps=3, seed=0,
                   alphas_cumprod=make_scheduler().alphas_cumprod)
    assert out["mc_acc_stderr"] == pytest.approx(math.sqrt(out["mc_acc"] * (1 - out["mc_acc"]) / 12))
    # MC 12·K·C = 12·2·3 + sampling 6·3 (no guidance) + held-out 12·4
    assert out["eval_network_evals"] == 72 + 18 + 48


def test_guidance_auto_is_chosen_on_the_choice_images_and_counted():
    """The scale is the choice with the lowest fd_ref between its samples (seed 1) and the
    choice images (val), each recomputed here; the reported samples use it on the reported
    images (seed 0); every choice's sampling counts in eval_network_evals."""
    from harness.evaluate import GUIDANCE_SEED, choose_guidance, sample_metrics

    x, y = toy_dataset()
    vx, vy = toy_dataset(4, seed=1)  # the reported split
    cx, _ = toy_dataset(4, seed=2)  # the choosing split
    ref = train_reference(x, y, epochs=2, seed=0, batch_size=16)
    gen, ac = tiny_model(0), make_scheduler().alphas_cumprod
    with pytest.raises(ValueError, match="choice_images"):
        evaluate(gen, gen, vx, vy, ref, mc_k=2, mc_images=4, sample_per_class=2, ddim_steps=3,
                 guidance_scale="auto", alphas_cumprod=ac)
    out = evaluate(gen, gen, vx, vy, ref, mc_k=2, mc_images=4, sample_per_class=2, ddim_steps=3,
                   guidance_scale="auto", guidance_choices=(1.0, 2.0), guidance_per_class=1,
                   choice_images=cx, seed=0, alphas_cumprod=ac)
    gen.eval()
    scores = {s: sample_metrics(gen, cx, ref, 1, 3, s, GUIDANCE_SEED)[0]["fd_ref"] for s in (1.0, 2.0)}
    chosen, got, evals = choose_guidance(gen, cx, ref, (1.0, 2.0), 1, 3)
    assert got == scores and chosen == min(scores, key=scores.get) == out["guidance_scale"]
    assert evals == 3 * 3 * 1 + 3 * 3 * 2  # C·1 sample·3 steps at s = 1, twice that at s = 2
    report, n_report = sample_metrics(gen, vx, ref, 2, 3, chosen, 0)
    assert out["fd_ref"] == pytest.approx(report["fd_ref"])  # the reported images, seed 0
    # MC 4·2·3 + choice 27 + reported sampling + held-out 12·4
    assert out["eval_network_evals"] == 24 + 27 + n_report + 48


def test_perception_scope_scores_the_heads_and_the_held_out_loss_only():
    """An evaluation during training with ``eval.every_metrics: perception``: the head's and the
    held-out loss's values are the full evaluation's, nothing else is computed, and it costs the
    held-out loss's N·4 forwards (no zero-shot classifier, guidance choice or samples)."""
    x, y = toy_dataset()
    vx, vy = toy_dataset(4, seed=1)
    ref = train_reference(x, y, epochs=2, seed=0, batch_size=16)
    gen, ac = tiny_model(0), make_scheduler().alphas_cumprod
    kw = dict(mc_k=2, mc_images=4, sample_per_class=2, ddim_steps=3, guidance_scale="auto",
              guidance_choices=(1.0, 2.0), choice_images=toy_dataset(4, seed=2)[0], seed=0,
              alphas_cumprod=ac)
    full = evaluate(gen, gen, vx, vy, ref, **kw)
    cheap = evaluate(gen, gen, vx, vy, ref, scope="perception", **kw)
    kept = {k for k in full if k.startswith(("head_", "heldout_loss"))}
    assert kept and set(cheap) == kept | {"eval_network_evals", "eval_seconds"}
    assert all(cheap[k] == full[k] for k in kept)
    assert cheap["eval_network_evals"] == vx.shape[0] * 4


class MeanSignHead(torch.nn.Module):
    """A 'model' whose head says class 1 when the image's mean pixel is positive, else 0; it
    records every input it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.seen = []

    def logits(self, x):
        self.seen.append(x.clone())
        m = x.flatten(1).mean(1)
        return torch.stack([-m, m], 1) * self.w


def test_robustness_is_the_heads_top1_on_q_sample_with_one_fixed_noise():
    """head_acc_t<t> by hand: x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε with ε ~ N(0, I) from ROBUST_SEED on the
    CPU, the same ε at every t; binomial stderr over the N images; noise_sigma_t<t> = √(1−ᾱ_t):
    0.091, 0.245, 0.463 at t = 50, 150, 300 on genrep.diffusion's cosine schedule."""
    from harness.evaluate import ROBUST_SEED, robust_metrics

    g = torch.Generator().manual_seed(5)
    x = (0.08 * torch.randn(40, 1, 4, 4, generator=g) + 0.03 * torch.randn(40, 1, 1, 1, generator=g)).clamp(-1, 1)
    y = (x.flatten(1).mean(1) > 0).long()  # the clean images: all right
    ac = make_scheduler().alphas_cumprod
    head = MeanSignHead()
    out = robust_metrics(head, x, y, ac, (50, 150, 300))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(ROBUST_SEED))
    accs = []
    for t, sigma in ((50, 0.0910), (150, 0.2449), (300, 0.4630)):
        a = ac[t].double()
        x_t = a.sqrt() * x.double() + (1 - a).sqrt() * eps.double()
        acc = ((x_t.flatten(1).mean(1) > 0).long() == y).double().mean().item()
        assert out[f"head_acc_t{t}"] == pytest.approx(acc), t
        assert out[f"head_acc_t{t}_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 40)), t
        assert out[f"noise_sigma_t{t}"] == pytest.approx(sigma, abs=5e-5), t
        accs.append(acc)
    assert accs[0] > accs[-1] and 0 < accs[-1] < 1  # noise that matters: the test can fail
    # one ε for every t: the head's inputs solved for their noise agree
    noise = [(s.double() - ac[t].double().sqrt() * x) / (1 - ac[t].double()).sqrt()
             for s, t in zip(head.seen, (50, 150, 300))]
    assert torch.allclose(noise[0], noise[2], atol=1e-4) and torch.allclose(noise[0], eps.double(), atol=1e-4)
    assert robust_metrics(head, x, y, ac, (50, 150, 300)) == out  # fixed: the same every call
    assert robust_metrics(head, x, y, ac, ()) == {}


def test_robustness_is_scored_in_every_evaluation_of_the_head():
    """``robust_t`` in the end-of-trial evaluation and in an ``every_metrics: perception`` one, with
    the same values (the reporting split's images, the same ε); not without it."""
    x, y = toy_dataset()
    vx, vy = toy_dataset(4, seed=1)
    ref = train_reference(x, y, epochs=2, seed=0, batch_size=16)
    gen, ac = tiny_model(0), make_scheduler().alphas_cumprod
    kw = dict(mc_k=2, mc_images=4, sample_per_class=1, ddim_steps=2, seed=0, alphas_cumprod=ac)
    full = evaluate(gen, gen, vx, vy, ref, robust_t=(50, 300), **kw)
    cheap = evaluate(gen, gen, vx, vy, ref, robust_t=(50, 300), scope="perception", **kw)
    robust = {k for k in full if k.startswith(("head_acc_t", "noise_sigma_t"))}
    assert robust == {"head_acc_t50", "head_acc_t50_stderr", "noise_sigma_t50", "head_acc_t300",
                      "head_acc_t300_stderr", "noise_sigma_t300"}
    assert all(cheap[k] == full[k] for k in robust)
    assert not {k for k in evaluate(gen, gen, vx, vy, ref, scope="perception", **kw)
                if k.startswith(("head_acc_t", "noise_sigma"))}
