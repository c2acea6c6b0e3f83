"""Datasets as webdataset shards: sources → pack (+ manifest) → verify (a reused pack cache, or
shards from elsewhere) → stream; a sweep's dataset resolved once (resolve) and read by trials (splits)."""
from .bench import loader_throughput
from .errors import DataError, SkipRecord
from .manifest import Manifest, MaskInfo, ShardInfo, SplitInfo, load_manifest, verify
from .pack import ensure_packed, pack
from .resolve import Dataset, data_root, resolve_dataset, url_patterns, urls_key
from .sources import SOURCES, Source, open_source
from .splits import forever, labelled_images, load_masked_split, load_split, mask_options, train_loader
from .stream import ShardLoader, is_labelled, make_loader, shard_urls, split_samples

__all__ = [
    "DataError", "Dataset", "data_root", "forever", "labelled_images", "load_masked_split", "load_split", "mask_options",
    "resolve_dataset", "train_loader", "url_patterns", "urls_key", "Manifest", "MaskInfo", "SOURCES", "ShardInfo", "ShardLoader", "SkipRecord", "Source",
    "SplitInfo", "ensure_packed", "is_labelled", "load_manifest", "loader_throughput",
    "make_loader", "open_source", "pack", "shard_urls", "split_samples", "verify",
]
