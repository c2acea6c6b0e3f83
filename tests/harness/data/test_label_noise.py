"""data.label_noise, the positive control's known harm: a fraction of the labelled training images
carry another class's label, chosen by each sample's key and the label seed alone (the same images
and the same wrong labels in every epoch, loader seed and worker split), never the true one."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from harness.config import ConfigError, from_dict
from harness.data import is_labelled, make_loader, shard_urls
from harness.data.stream import noisy_label
from tests.conftest import tiny_sweep
from tests.harness.data.conftest import keys_of


def within(k: int, n: int, f: float) -> bool:
    """k of n is within 4 binomial standard deviations of f."""
    return abs(k / n - f) < 4 * math.sqrt(f * (1 - f) / n)


def test_noisy_label_rate_never_the_true_label_and_uniform_over_the_others():
    keys = [f"{k:07d}" for k in range(5000)]
    new = [noisy_label(key, k % 10, 0.4, 0, 10) for k, key in enumerate(keys)]
    flipped = [(k % 10, y) for k, y in enumerate(new) if y != k % 10]
    assert within(len(flipped), 5000, 0.4)
    assert all(0 <= y < 10 for _, y in flipped)
    # the shift (y' − y) mod C is uniform over 1..C − 1: each of 9 values ≈ 1/9 of the flips
    shifts = Counter((y - t) % 10 for t, y in flipped)
    assert set(shifts) == set(range(1, 10))
    assert all(within(c, len(flipped), 1 / 9) for c in shifts.values())
    assert new == [noisy_label(key, k % 10, 0.4, 0, 10) for k, key in enumerate(keys)]  # a function
    other = [noisy_label(key, k % 10, 0.4, 1, 10) for k, key in enumerate(keys)]
    assert other != new  # another label seed: another subset
    assert all(noisy_label(key, 3, 0.0, 0, 10) == 3 for key in keys[:200])
    assert all(noisy_label(key, 1, 0.999999, 0, 2) == 0 for key in keys[:200])  # two classes: the other


def test_the_loader_flips_about_40_percent_of_the_labelled_digits(digits8):
    """With 25% labels and 40% noise: the same images are labelled as without noise, and among them
    exactly the keys noisy_label picks (≈ 40%) carry a wrong label; unlabelled ones stay −1."""
    urls = shard_urls(digits8, "train")
    keys = keys_of(urls)
    clean = torch.cat([b[1] for b in make_loader(urls, 64, shuffle_shards=False, drop_last=False)])
    part = dict(shuffle_shards=False, drop_last=False, labelled_fraction=0.25, label_seed=3)
    plain = torch.cat([b[1] for b in make_loader(urls, 64, **part)])
    noisy = torch.cat([b[1] for b in make_loader(urls, 64, label_noise=0.4, num_classes=10, **part)])
    labelled = plain >= 0
    assert torch.equal(noisy >= 0, labelled)  # noise never changes which images are labelled
    wrong = labelled & (noisy != clean)
    assert within(int(wrong.sum()), int(labelled.sum()), 0.4)
    expect = torch.tensor([is_labelled(k, 0.25, 3) and noisy_label(k, int(y), 0.4, 3, 10) != int(y)
                           for k, y in zip(keys, clean)])  # pack order = key order here
    assert torch.equal(wrong, expect)
    assert torch.equal(noisy[labelled & ~wrong], clean[labelled & ~wrong])


def rows(loader) -> Counter:
    """Multiset of (label or −1, image bytes) over one epoch of a loader."""
    return Counter((int(y), x.numpy().tobytes()) for batch in loader for x, y in zip(*batch[:2]))


def test_the_same_wrong_labels_in_every_epoch_seed_and_worker_split(digits8):
    urls = shard_urls(digits8, "train")
    noise = dict(labelled_fraction=0.5, label_noise=0.4, num_classes=10, drop_last=False)
    one = make_loader(urls, 32, seed=0, shuffle_buffer=50, **noise)
    reference = rows(one)
    assert rows(one) == reference  # the next epoch reshuffles; the same images keep the same labels
    for seed, world in ((7, 1), (1, 3)):
        got = sum((rows(make_loader(urls, 16, rank=r, world_size=world, seed=seed, shuffle_buffer=30,
                                    **noise)) for r in range(world)), Counter())
        assert got == reference, (seed, world)


def test_label_noise_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data.label_noise: must be in \[0, 1\)"):
        from_dict(tiny_sweep(tmp_path, data={"label_noise": 1.0}))
    assert from_dict(tiny_sweep(tmp_path, data={"label_noise": 0.4})).arm("sum", 0).data.label_noise == 0.4
    with pytest.raises(ValueError, match="label_noise must be in"):
        make_loader(["x.tar"], 4, label_noise=0.4)  # no num_classes
