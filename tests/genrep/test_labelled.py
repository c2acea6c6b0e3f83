"""Scarce labels (data.labelled_fraction < 1): an unlabelled image has label −1 (and an all −1
mask); the perception losses skip it but divide by the whole batch, generation conditions it on ∅."""
import math

import pytest
import torch
import torch.nn.functional as F

from genrep.dense import pixel_cross_entropy, segmentation_loss, soft_dice_loss
from genrep.diffusion import DenoisingDraws, condition, make_scheduler
from genrep.losses import UNLABELLED, cross_entropy, distillation_loss, generation_loss, perception_loss

LN3 = math.log(3.0)


def test_cross_entropy_skips_unlabelled_rows_and_divides_by_the_batch():
    """Rows 0 and 2 labelled: softmax [1/4, 3/4] → −ln(3/4); [3/4, 1/4] → ln 4; row 1 adds
    nothing: L = (ln(4/3) + ln 4)/3 = ln(16/3)/3, not /2."""
    z = torch.tensor([[0.0, LN3], [0.0, 0.0], [LN3, 0.0]])
    y = torch.tensor([1, UNLABELLED, 1])
    loss, m = cross_entropy(z, y)
    assert loss.item() == pytest.approx(math.log(16 / 3) / 3, rel=1e-6)
    assert m["acc"].item() == 0.5  # row 0 right, row 2 wrong; row 1 not counted
    assert m["labelled"].item() == pytest.approx(2 / 3)


def test_no_labelled_row_gives_zero_loss_and_no_accuracy():
    z = torch.randn(4, 3, requires_grad=True)
    loss, m = cross_entropy(z, torch.full((4,), UNLABELLED))
    assert loss.item() == 0.0 and "acc" not in m and m["labelled"].item() == 0.0
    (g,) = torch.autograd.grad(loss, z)
    assert (g == 0).all()


def test_fully_labelled_batch_is_bitwise_the_plain_mean():
    z, y = torch.randn(7, 10, generator=torch.Generator().manual_seed(0)), torch.arange(7) % 10
    for eps in (0.0, 0.1):
        assert torch.equal(cross_entropy(z, y, eps)[0], F.cross_entropy(z, y, label_smoothing=eps))


def test_label_smoothing_over_labelled_rows_only():
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2, UNLABELLED, 0, UNLABELLED, 3])
    keep = y >= 0
    expect = F.cross_entropy(z[keep], y[keep], label_smoothing=0.2) * 3 / 5
    assert cross_entropy(z, y, 0.2)[0].item() == pytest.approx(expect.item(), rel=1e-6)


def test_two_ranks_average_to_one_rank_on_the_whole_batch():
    """Each rank divides by its own B/W and the engine averages: (1/W)Σ_r (W/B)Σ_{b∈r} = (1/B)Σ_b,
    however unevenly the labelled rows fall (rank 0 here has 3 of them, rank 1 none)."""
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2, 3, UNLABELLED, UNLABELLED, UNLABELLED])
    whole = cross_entropy(z, y)[0]
    ranks = (cross_entropy(z[:3], y[:3])[0] + cross_entropy(z[3:], y[3:])[0]) / 2
    assert ranks.item() == pytest.approx(whole.item(), rel=1e-6)


def test_perception_loss_distils_into_unlabelled_rows():
    """The teacher scores every row, labelled or not: L = L_ce(labelled, /B) + β·τ²·ΣKL/B."""
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, UNLABELLED, UNLABELLED, 2])
    q = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(4)), -1)
    loss, m = perception_loss(z, y, q, beta=0.5, tau=2.0)
    ce, kd = cross_entropy(z, y)[0], distillation_loss(z, q, 2.0, batch_size=4)[0]
    assert loss.item() == pytest.approx((ce + 0.5 * kd).item(), rel=1e-6)
    assert m["acc"].item() == ((z[[0, 3]].argmax(-1) == y[[0, 3]]).float().mean()).item()
    assert m["labelled"].item() == 0.5
    # without CE the head still learns the unlabelled rows from the teacher
    loss, _ = perception_loss(z.requires_grad_(), y, q, beta=1.0, use_ce=False)
    (g,) = torch.autograd.grad(loss, z)
    assert (g[1:3].abs().sum(-1) > 0).all()


def test_condition_maps_unlabelled_to_the_null_class():
    labels = torch.tensor([3, UNLABELLED, 5, UNLABELLED])
    drop = torch.tensor([True, False, False, True])
    assert condition(labels, drop, null_class=10).tolist() == [10, 10, 5, 10]


def test_generation_loss_trains_unlabelled_images_unconditionally():
    seen = {}

    def eps_fn(x_t, t, c):
        seen["c"] = c
        return torch.zeros_like(x_t)

    draws = DenoisingDraws(torch.tensor([1, 2, 3]), torch.ones(3, 1, 2, 2), torch.zeros(3, dtype=torch.bool))
    generation_loss(eps_fn, torch.zeros(3, 1, 2, 2), torch.tensor([4, UNLABELLED, 6]), draws,
                    make_scheduler(num_train_timesteps=10).alphas_cumprod, null_class=9)
    assert seen["c"].tolist() == [4, 9, 6]


def test_segmentation_ignores_the_masks_of_unlabelled_images():
    """Image 1 unlabelled (mask all −1): the pixel CE sums image 0's pixels and divides by all
    B·H·W; Dice and seg_acc are image 0's alone."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    masks = torch.randint(0, 3, (2, 4, 4), generator=g)
    masks[1] = -1
    ce = pixel_cross_entropy(logits, masks)
    expect = F.cross_entropy(logits[:1], masks[:1], reduction="sum") / masks.numel()
    assert ce.item() == pytest.approx(expect.item(), rel=1e-6)
    assert soft_dice_loss(logits, masks).item() == pytest.approx(
        soft_dice_loss(logits[:1], masks[:1]).item(), rel=1e-6)
    loss, m = segmentation_loss(logits, masks, dice_weight=1.0)
    assert m["seg_acc"].item() == (logits[0].argmax(0) == masks[0]).float().mean().item()
    # no target pixel at all: zero loss, a gradient of zeros, no accuracy
    z = logits.clone().requires_grad_()
    loss, m = segmentation_loss(z, torch.full_like(masks, -1), dice_weight=1.0)
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and (grad == 0).all() and "seg_acc" not in m


def test_segmentation_with_every_target_is_bitwise_unchanged():
    g = torch.Generator().manual_seed(6)
    logits, masks = torch.randn(3, 4, 5, 5, generator=g), torch.randint(0, 4, (3, 5, 5), generator=g)
    assert torch.equal(pixel_cross_entropy(logits, masks), F.cross_entropy(logits, masks))
    p = logits.softmax(1)
    oh = F.one_hot(masks, 4).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    dice = (2 * (p * oh).sum(dims) + 1e-6) / (p.sum(dims) + oh.sum(dims) + 1e-6)
    assert torch.equal(soft_dice_loss(logits, masks), 1 - dice[oh.sum(dims) > 0].mean())
