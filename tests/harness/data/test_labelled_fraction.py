"""data.labelled_fraction: the labelled images are a function of each sample's key and the label
seed, never of the stream's order: the same in every epoch, loader seed and worker split."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config import ConfigError, from_dict
from harness.data import is_labelled, make_loader, open_source, pack, shard_urls
from tests.conftest import tiny_sweep
from tests.harness.data.conftest import keys_of


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return pack("shapes", tmp_path_factory.mktemp("shapes"), shard_size=10, count=40)


def rows(loader) -> Counter:
    """Multiset of (label or −1, image bytes) over one epoch of a loader."""
    return Counter((int(y), x.numpy().tobytes()) for batch in loader for x, y in zip(*batch[:2]))


def test_is_labelled_hand_values_and_extremes():
    assert all(is_labelled(str(k), 1.0, 0) for k in range(1000))  # u < 1 always
    frac = np.mean([is_labelled(f"{k:07d}", 0.25, 0) for k in range(4000)])
    assert abs(frac - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    # a different seed picks a different (but equally large) subset
    a = {k for k in range(4000) if is_labelled(f"{k:07d}", 0.25, 0)}
    b = {k for k in range(4000) if is_labelled(f"{k:07d}", 0.25, 1)}
    assert a != b and abs(len(a & b) / 4000 - 0.25**2) < 0.02


def test_fraction_of_labelled_digits_and_which(digits8):
    """≈ f of the 1,437 training keys are labelled (within 4 binomial sd), and the loader labels
    exactly the images of those keys, with their true labels."""
    urls = shard_urls(digits8, "train")
    keys = keys_of(urls)
    chosen = [k for k in keys if is_labelled(k, 0.25, 0)]
    n = len(keys)
    assert abs(len(chosen) / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    full = make_loader(urls, 64, shuffle_shards=False, drop_last=False)
    part = make_loader(urls, 64, shuffle_shards=False, drop_last=False, labelled_fraction=0.25)
    ys_full = torch.cat([b[1] for b in full])
    ys_part = torch.cat([b[1] for b in part])
    expect = torch.tensor([k in set(chosen) for k in keys])  # pack order = key order here
    assert torch.equal(ys_part >= 0, expect)
    assert torch.equal(ys_part[expect], ys_full[expect]) and (ys_part[~expect] == -1).all()


def test_the_same_images_in_every_epoch_seed_and_worker_split(digits8):
    urls = shard_urls(digits8, "train")
    one = make_loader(urls, 32, seed=0, shuffle_buffer=50, drop_last=False, labelled_fraction=0.3)
    reference = rows(one)
    assert rows(one) == reference  # the next epoch reshuffles, the same images stay labelled
    for seed, world, workers in ((7, 1, 0), (1, 3, 0), (2, 2, 2)):
        got = sum((rows(make_loader(urls, 16, rank=r, world_size=world, num_workers=workers, seed=seed,
                                    shuffle_buffer=30, drop_last=False, labelled_fraction=0.3))
                   for r in range(world)), Counter())
        assert got == reference, (seed, world, workers)
    other = rows(make_loader(urls, 32, drop_last=False, labelled_fraction=0.3, label_seed=1))
    assert other != reference and sum(other.values()) == sum(reference.values())


def test_masks_of_unlabelled_images_are_all_ignored(shapes):
    urls = shard_urls(shapes, "train")
    keys = keys_of(urls)
    src = open_source("shapes", image_size=16, count=40)
    loader = make_loader(urls, 64, shuffle_shards=False, drop_last=False, masks=True, mask_classes=11,
                         labelled_fraction=0.5, label_seed=3)
    _, ys, masks = (torch.cat(p) for p in zip(*loader))
    assert masks.dtype == torch.int64
    for key, y, mask in zip(keys, ys, masks):
        if is_labelled(key, 0.5, 3):
            assert y == src.labels[int(key)] and torch.equal(mask, torch.from_numpy(src.load(int(key))[1]).long())
        else:
            assert y == -1 and (mask == -1).all()
    assert 0 < int((ys >= 0).sum()) < len(keys)


def test_config_field_is_checked(tmp_path):
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"data.labelled_fraction: must be in \(0, 1\]"):
            from_dict(tiny_sweep(tmp_path, data={"labelled_fraction": bad}))
    with pytest.raises(ValueError, match="labelled_fraction"):
        make_loader(["x.tar"], 4, labelled_fraction=0.0)
    cfg = from_dict(tiny_sweep(tmp_path, data={"labelled_fraction": 0.25},
                               grid={"data.labelled_fraction": [0.1, 1.0]}))
    assert sorted(t.data.labelled_fraction for t in cfg.trials()) == [0.1, 0.1, 1.0, 1.0]


# ---------------------------------------------------------------- the step on scarce labels
@pytest.fixture(scope="module")
def group(gloo_group):
    """The one-rank gloo group of tests/conftest.py."""


@pytest.mark.parametrize("strategy", ["genrep", "separate"])
def test_a_step_on_a_quarter_of_the_labels(group, tmp_path, tiny_data_root, strategy):
    """The worker's loader and step (harness.worker.train_loop's pieces): unlabelled rows reach
    the teacher and generation (∅), not L_ce; the logged accuracy is over the labelled rows."""
    from harness.data import resolve_dataset
    from harness.step import Shard, make_step
    from harness.teacher import teacher_inputs

    raw = tiny_sweep(tmp_path, tiny_data_root, strategies=[strategy],
                     data={"labelled_fraction": 0.25, "label_seed": 0}, train={"batch_size": 16})
    cfg = from_dict(raw)
    trial, data = cfg.trials()[0], resolve_dataset(cfg)
    step_fn = make_step(trial, Shard(0, 1, 16), torch.device("cpu"), **teacher_inputs(trial, data, torch.device("cpu")))
    loader = make_loader(data.train, 16, seed=trial.seed, image_size=8,
                         labelled_fraction=trial.data.labelled_fraction, label_seed=trial.data.label_seed)
    for step, (x, y) in zip(range(2), loader):
        out = step_fn(x, y, step)
        share = float((y >= 0).float().mean())
        assert out["labelled"] == pytest.approx(share) and 0 < share < 1
        assert out["loss_kd"] > 0 and all(math.isfinite(float(v)) for v in out.values())


# A real Ray Train trial with a quarter of the labels, over two simulated nodes:
# tests/harness/test_cli_cluster.py::test_two_node_cluster_strict_spread_trial.
