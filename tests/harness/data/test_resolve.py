"""harness.data.resolve: a sweep's dataset, resolved once — packed with every pack setting of the
sweep (shapes_per_image included, which perf's P4 once left out), described by its manifest, and
carried across Ray as a plain mapping."""
from __future__ import annotations

import json

import pytest

from harness.config import ConfigError, from_dict
from harness.data import Dataset, load_manifest, resolve_dataset
from harness.data.resolve import pack_params


def test_a_packed_source_is_described_by_its_manifest(tiny):
    data = resolve_dataset(from_dict(tiny()))
    manifest = load_manifest(data.manifest)
    for split in ("train", "val", "test"):
        assert data.urls(split) == [str(manifest.root / s.file) for s in manifest.split(split).shards]
    assert sum(data.class_counts) == manifest.split("train").count and len(data.class_counts) == 10
    assert data.key.startswith(manifest.root.name) and data.mask_classes is None
    assert resolve_dataset(from_dict(tiny())) == data  # the cache is reused: same shards, same key
    with pytest.raises(ValueError, match="unknown split 'bogus'"):
        data.urls("bogus")


def test_it_crosses_ray_as_a_plain_mapping(tiny):
    data = resolve_dataset(from_dict(tiny()))
    plain = data.plain()
    assert json.loads(json.dumps(plain)) == {**plain, "class_counts": list(data.class_counts)}
    assert Dataset(**plain) == data


def test_every_pack_setting_is_part_of_the_pack(tmp_path):
    """A shapes sweep with k shapes an image packs those shapes (the manifest records them), so
    every caller of resolve_dataset (trials, perf's P4) reads the same dataset."""
    raw = {"name": "s", "output_dir": str(tmp_path / "out"), "strategies": ["sum"],
           "data": {"source": "shapes", "count": 60, "image_size": 16, "shard_size": 30,
                    "shapes_per_image": 2, "root": str(tmp_path / "data")}}
    sweep = from_dict(raw)
    assert pack_params(sweep)["source_options"] == {"shapes_per_image": 2}
    data = resolve_dataset(sweep)
    assert load_manifest(data.manifest).source_params["shapes_per_image"] == [2, 2]
    one = resolve_dataset(from_dict({**raw, "data": {**raw["data"], "shapes_per_image": None}}))
    assert one.key != data.key and one.manifest != data.manifest


def test_masks_are_checked_against_the_seg_head(tmp_path):
    raw = {"name": "s", "output_dir": str(tmp_path / "out"), "strategies": ["sum"],
           "data": {"source": "shapes", "count": 40, "image_size": 16, "shard_size": 40,
                    "masks": True, "root": str(tmp_path / "data")},
           "method": {"beta_kd": 0.0, "perception": {"tasks": ["classify", "segment"]}}}
    assert resolve_dataset(from_dict(raw)).mask_classes == 11
    bad = {**raw, "model": {"preset": "digits16", "overrides": {"num_classes": 5}}}
    with pytest.raises(ConfigError, match="model.overrides.num_classes: the masks have 11 classes"):
        resolve_dataset(from_dict(bad))
