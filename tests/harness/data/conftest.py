"""Shared by the labelled-fraction and label-noise tests: one pack of every digit at 8 px, and the
sample keys of shards."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from harness.data import pack


@pytest.fixture(scope="session")
def digits8(tmp_path_factory) -> Path:
    """All 1,797 digits at 8 px: 1,437 train images in 300-sample shards."""
    return pack("digits", tmp_path_factory.mktemp("digits8"), image_size=8, shard_size=300)


def keys_of(urls) -> list[str]:
    """Every sample key of the shards, in shard order."""
    out = []
    for u in urls:
        with tarfile.open(u) as t:
            out += [n.split(".")[0] for n in t.getnames() if n.endswith(".cls")]
    return out
