"""Loader throughput: decoded images per second, warm-up excluded (used by the perf command)."""
from __future__ import annotations

import os
import time

from .manifest import Manifest, load_manifest
from .stream import make_loader, shard_urls


def loader_throughput(manifest: Manifest | str | os.PathLike, batch_size: int = 64, seconds: float = 2.0,
                      warmup_batches: int = 3, split: str = "train", num_workers: int = 0) -> float:
    """Images/s of the resampled (endless) train stream, PNG decode included.

    The first `warmup_batches` (file opening, first shards, worker start-up) are not timed."""
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    loader = make_loader(shard_urls(m, split), batch_size, num_workers=num_workers, resampled=True)
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    images, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        images += len(next(it)[1])
    return images / elapsed
