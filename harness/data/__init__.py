"""Datasets as webdataset shards: sources → pack (+ manifest) → verify → stream."""
from .bench import loader_throughput
from .errors import DataError, SkipRecord
from .manifest import Manifest, ShardInfo, SplitInfo, load_manifest, verify
from .pack import ensure_packed, pack
from .sources import SOURCES, Source, open_source
from .stream import ShardLoader, batches_per_epoch, make_loader, shard_urls, split_samples

__all__ = [
    "DataError", "Manifest", "SOURCES", "ShardInfo", "ShardLoader", "SkipRecord", "Source",
    "SplitInfo", "batches_per_epoch", "ensure_packed", "load_manifest", "loader_throughput",
    "make_loader", "open_source", "pack", "shard_urls", "split_samples", "verify",
]
