"""The GenRep network: both backbones, the null class, encoder-only features, parameter split."""
from __future__ import annotations

import pytest
import torch

from genrep.model import PRESETS, build_model, num_parameters, preset

TINY = dict(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, head_hidden=16)


@pytest.mark.parametrize("name, overrides", [
    ("digits16", TINY),
    ("digits16", {**TINY, "head": "mlp", "attention": True}),
    ("dit16", dict(image_size=8, dit_depth=2, dit_heads=2, dit_head_dim=8)),
])
def test_shapes_and_parameter_split(name, overrides):
    cfg = preset(name, **overrides)
    model = build_model(cfg, seed=0)
    x = torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([0, 5, model.null_class])  # the null class is a valid label
    assert model.eps(x, t, y).shape == x.shape
    assert model.logits(x).shape == (3, cfg.num_classes)
    shared, head = model.shared_parameters(), model.head_parameters()
    assert sum(p.numel() for p in shared + head) == num_parameters(model)
    assert not {id(p) for p in shared} & {id(p) for p in head}


def test_seeded_build_is_identical_and_does_not_touch_global_rng():
    cfg = preset("digits16", **TINY)
    state = torch.random.get_rng_state()
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unet_features_equal_the_full_forward_mid_block():
    """The encoder-only path gives exactly the mid-block output of the full UNet forward."""
    model = build_model(preset("digits16", **TINY), seed=0).eval()
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.full((2,), 10), torch.full((2,), model.null_class)
    seen = {}
    hook = model.backbone.unet.mid_block.register_forward_hook(lambda m, i, o: seen.update(o=o))
    with torch.no_grad():
        model.eps(x, t, y)
        feats = model.backbone.features(x, t, y)
    hook.remove()
    assert torch.allclose(feats, seen["o"].mean(dim=(2, 3)), atol=1e-6)


def test_perception_gradient_does_not_reach_the_decoder():
    """Features run the encoder half only, so the up blocks get no perception gradient."""
    model = build_model(preset("digits16", **TINY), seed=0)
    model.logits(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is None for p in model.backbone.unet.up_blocks.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_presets_and_unknown():
    assert {"digits16", "rgb32", "rgb64", "dit16"} <= set(PRESETS)
    with pytest.raises(KeyError, match="known"):
        preset("nope")
