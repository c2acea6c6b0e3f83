"""Dense perception: hand-computed segmentation loss, Dice and mIoU; the seg head's shape, its
gradient flow, and that configs without it build exactly the model they built before."""
from __future__ import annotations

import math

import pytest
import torch

from genrep.dense import (confusion_matrix, miou, pixel_accuracy, segmentation_loss,
                          soft_dice_loss)
from genrep.model import build_model, num_parameters, preset

TINY = dict(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, head_hidden=16)


def scores(pred, target, k):
    m = confusion_matrix(torch.tensor(pred), torch.tensor(target), k)
    mean, per_class = miou(m)
    return m, mean.item(), per_class


# ---------------------------------------------------------------- metrics
def test_perfect_prediction_has_miou_one():
    target = torch.randint(0, 3, (2, 5, 5), generator=torch.Generator().manual_seed(0))
    m = confusion_matrix(target, target, 3)
    mean, per_class = miou(m)
    assert mean.item() == 1.0 and per_class.tolist() == [1.0, 1.0, 1.0]
    assert pixel_accuracy(m).item() == 1.0


def test_hand_computed_partial_overlap():
    # target 0 0 1 1 2 2 / pred 0 1 1 1 2 0: IoU = 1/(2+2−1), 2/(2+3−2), 1/(2+1−1) = 1/3, 2/3, 1/2
    m, mean, per_class = scores([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2], 3)
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows: truth, columns: prediction
    assert per_class.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert mean == pytest.approx(0.5)
    assert pixel_accuracy(m).item() == pytest.approx(4 / 6)


def test_class_empty_in_target_and_prediction_is_left_out():
    # class 3 nowhere: NaN, out of the mean (counting it as 1 would give 0.625, as 0 give 0.375)
    m, mean, per_class = scores([0, 1, 1, 2], [0, 0, 1, 2], 4)
    assert per_class[:3].tolist() == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert math.isnan(per_class[3].item())
    assert mean == pytest.approx(2 / 3)


def test_class_only_predicted_counts_as_zero():
    _, mean, per_class = scores([0, 1], [0, 0], 3)
    assert per_class[:2].tolist() == [0.5, 0.0] and math.isnan(per_class[2].item())
    assert mean == pytest.approx(0.25)


def test_all_background():
    _, mean, per_class = scores([0] * 4, [0] * 4, 3)  # only the background is seen: it is perfect
    assert mean == 1.0 and per_class[0].item() == 1.0 and per_class[1:].isnan().all()
    m, mean, per_class = scores([0] * 4, [0, 0, 2, 2], 3)  # the shape missed entirely
    assert per_class[0].item() == 0.5 and per_class[2].item() == 0.0
    assert mean == pytest.approx(0.25) and pixel_accuracy(m).item() == 0.5


def test_empty_confusion_and_bad_values():
    mean, per_class = miou(torch.zeros(3, 3, dtype=torch.long))
    assert math.isnan(mean.item()) and per_class.isnan().all()
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


# ---------------------------------------------------------------- losses
def one_by_two():
    """Pixel 1: logits (0, 0), mask 0 → p = (1/2, 1/2); pixel 2: (log 3, 0), mask 1 → p = (3/4, 1/4)."""
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # [B=1, K=2, H=1, W=2]
    return logits, torch.tensor([[[0, 1]]])


def test_segmentation_loss_hand_value():
    logits, masks = one_by_two()
    loss, metrics = segmentation_loss(logits, masks)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2)  # (−log ½ − log ¼) / 2
    assert metrics["seg_acc"].item() == 0.5 and "loss_dice" not in metrics


def test_dice_hand_value():
    # class 0: 2·½ / (½ + ¾ + 1) = 4/9; class 1: 2·¼ / (½ + ¼ + 1) = 2/7; 1 − (4/9 + 2/7)/2 = 40/63
    logits, masks = one_by_two()
    assert soft_dice_loss(logits, masks, eps=0.0).item() == pytest.approx(40 / 63)
    assert soft_dice_loss(logits, masks).item() == pytest.approx(40 / 63, abs=1e-5)
    # a third class absent from the masks is left out of the mean (p ≈ 0 keeps the rest equal)
    three = torch.cat([logits, torch.full((1, 1, 1, 2), -1e4)], dim=1)
    assert soft_dice_loss(three, masks, eps=0.0).item() == pytest.approx(40 / 63)
    loss, metrics = segmentation_loss(logits, masks, dice_weight=0.5)
    assert loss.item() == pytest.approx(1.5 * math.log(2) + 0.5 * 40 / 63, abs=1e-5)
    assert metrics["loss_dice"].item() == pytest.approx(40 / 63, abs=1e-5)


# ---------------------------------------------------------------- the seg head
@pytest.mark.parametrize("name, overrides", [
    ("digits16", TINY),
    ("digits16", {}),
    ("digits16", {**TINY, "attention": True, "head": "mlp"}),
    ("dit16", dict(image_size=8, dit_depth=2, dit_heads=2, dit_head_dim=8)),
])
def test_seg_head_output_at_input_resolution(name, overrides):
    cfg = preset(name, seg_head=True, **overrides)
    # eval: diffusers' DiT drops labels at random in training mode (its own CFG dropout, 10%)
    model = build_model(cfg, seed=0).eval()
    x = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size)
    s = cfg.image_size
    assert model.seg_logits(x).shape == (2, cfg.num_classes + 1, s, s) == (2, cfg.seg_classes, s, s)
    out = model.perceive(x)  # one backbone pass feeds both heads, with the same values
    assert torch.equal(out["logits"], model.logits(x))
    assert torch.equal(out["seg_logits"], model.seg_logits(x))


def test_unet_dense_levels_equal_the_full_forward_up_blocks():
    """The replicated up loop gives exactly the up blocks' outputs of the UNet's own forward."""
    model = build_model(preset("digits16", seg_head=True), seed=0).eval()
    x, seen = torch.randn(2, 1, 16, 16), []
    t, y = torch.full((2,), 10), torch.full((2,), model.null_class)
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o))
             for b in model.backbone.unet.up_blocks]
    with torch.no_grad():
        model.eps(x, t, y)
        for h in hooks:
            h.remove()
        pooled, levels = model.backbone.features_and_dense(x, t, y)
    assert [f.shape[1] for f in levels] == list(model.backbone.dense_channels) == [64, 64, 32]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(levels, seen, strict=True))
    assert torch.allclose(pooled, model.backbone.features(x, t, y), atol=1e-6)


def test_seg_gradient_reaches_itself_and_shared_features_only():
    model = build_model(preset("digits16", seg_head=True, **TINY), seed=0)
    loss, _ = segmentation_loss(model.seg_logits(torch.randn(2, 1, 8, 8)),
                                torch.randint(0, 11, (2, 8, 8)), dice_weight=1.0)
    loss.backward()
    unet = model.backbone.unet
    assert all(p.grad is not None for p in model.seg_head.parameters())
    assert all(p.grad is None for p in model.head.parameters())  # not the classification head
    for part in (unet.conv_in, unet.down_blocks, unet.mid_block, unet.up_blocks):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in unet.conv_out.parameters())  # ε's output layer is not read


def test_parameter_split_with_seg_head():
    on = build_model(preset("digits16", seg_head=True, **TINY), seed=0)
    off = build_model(preset("digits16", **TINY), seed=0)
    shared, head = on.shared_parameters(), on.head_parameters()
    assert sum(p.numel() for p in shared + head) == num_parameters(on)
    assert not {id(p) for p in shared} & {id(p) for p in head}
    assert {id(p) for p in on.seg_head.parameters()} <= {id(p) for p in head}
    assert [p.shape for p in shared] == [p.shape for p in off.shared_parameters()]


def test_seg_head_off_builds_the_same_model_as_before():
    """The seg head is built last and only when on: seeded inits of existing configs don't move."""
    for overrides in (TINY, {}):
        off = build_model(preset("digits16", **overrides), seed=0).state_dict()
        on = build_model(preset("digits16", seg_head=True, **overrides), seed=0).state_dict()
        assert not any(k.startswith("seg_head") for k in off)
        assert sorted(k for k in on if not k.startswith("seg_head")) == sorted(off)
        assert all(torch.equal(off[k], on[k]) for k in off)
    model = build_model(preset("digits16"), seed=0)
    assert model.seg_head is None and num_parameters(model) == 1_064_683  # as before issue 22
    assert len(list(model.parameters())) == 157
    with pytest.raises(ValueError, match="seg_head=True"):
        model.seg_logits(torch.randn(1, 1, 16, 16))
    assert set(model.perceive(torch.randn(1, 1, 16, 16))) == {"logits"}


def test_seg_head_size_on_digits16():
    # 1×1 projections 64·32+32, 64·32+32, 32·32+32; GroupNorm 2·32; 3×3 32·32·9+32; 1×1 32·11+11
    model = build_model(preset("digits16", seg_head=True), seed=0)
    assert num_parameters(model.seg_head) == 2080 + 2080 + 1056 + 64 + 9248 + 363 == 14_891


def test_bootstrap_stderr_over_images():
    from genrep.dense import bootstrap_stderr, image_confusions, miou, pixel_accuracy

    target = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [2, 2]], [[0, 0], [0, 1]]])
    conf = image_confusions(target, target, 3)
    assert conf.shape == (3, 3, 3) and torch.equal(conf.sum(0), confusion_matrix(target, target, 3))
    assert bootstrap_stderr(conf, lambda m: miou(m)[0]) == 0.0  # perfect on every resample
    wrong = image_confusions(torch.zeros_like(target), target, 3)
    se = bootstrap_stderr(wrong, pixel_accuracy, seed=3)
    assert se == bootstrap_stderr(wrong, pixel_accuracy, seed=3) > 0  # seeded
    assert math.isnan(bootstrap_stderr(wrong[:1], pixel_accuracy))  # one image: no spread
