"""genrep.pretrained: the backbone round-trips through diffusers' save_pretrained/from_pretrained
bitwise, the heads keep their own initialisation, and another architecture is refused."""
from __future__ import annotations

import pytest
import torch

from genrep.model import build_model, preset
from genrep.pretrained import ArchitectureMismatch, diffusers_network, load_backbone, save_backbone, weights_digest

TINY = dict(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, head_hidden=16)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_the_backbone_round_trips_and_the_heads_stay_the_seeds(tmp_path, backbone):
    over = TINY if backbone == "unet" else dict(image_size=8, backbone="dit", dit_depth=2, dit_heads=2,
                                                  dit_head_dim=8, dit_patch=2, head_hidden=16)
    src, dst = build_model(preset("digits16", **over), seed=0), build_model(preset("digits16", **over), seed=1)
    head_before = {k: v.clone() for k, v in dst.head.state_dict().items()}
    save_backbone(src, tmp_path / "init")
    assert (tmp_path / "init" / "config.json").exists()
    load_backbone(dst, tmp_path / "init")
    for (k, a), b in zip(diffusers_network(src).state_dict().items(), diffusers_network(dst).state_dict().values()):
        assert torch.equal(a, b), k
    for k, v in dst.head.state_dict().items():
        assert torch.equal(v, head_before[k])  # the head is the trial's own (seed 1)
    assert any(not torch.equal(v, src.head.state_dict()[k]) for k, v in dst.head.state_dict().items())
    assert weights_digest(tmp_path / "init") == weights_digest(tmp_path / "init")


def test_another_architecture_is_refused_naming_the_keys(tmp_path):
    save_backbone(build_model(preset("digits16", **TINY), seed=0), tmp_path / "init")
    other = build_model(preset("digits16", **{**TINY, "num_classes": 5}), seed=0)
    with pytest.raises(ArchitectureMismatch, match=r"num_class_embeds: checkpoint 11, model 6"):
        load_backbone(other, tmp_path / "init")
    wider = build_model(preset("digits16", **{**TINY, "block_out_channels": (8, 32)}), seed=0)
    with pytest.raises(ArchitectureMismatch, match="block_out_channels"):
        load_backbone(wider, tmp_path / "init")
