"""Datasets as webdataset shards: sources → pack (+ manifest) → verify (a reused pack cache, or
shards from elsewhere) → stream."""
from .bench import loader_throughput
from .errors import DataError, SkipRecord
from .manifest import Manifest, MaskInfo, ShardInfo, SplitInfo, load_manifest, verify
from .pack import ensure_packed, pack
from .sources import SOURCES, Source, open_source
from .stream import ShardLoader, is_labelled, make_loader, shard_urls, split_samples

__all__ = [
    "DataError", "Manifest", "MaskInfo", "SOURCES", "ShardInfo", "ShardLoader", "SkipRecord", "Source",
    "SplitInfo", "ensure_packed", "is_labelled", "load_manifest", "loader_throughput",
    "make_loader", "open_source", "pack", "shard_urls", "split_samples", "verify",
]
