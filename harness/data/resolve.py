"""A sweep's dataset, resolved once at the driver: shard URLs per split, where caches go, what the
reference classifier's cache is keyed by, the training split's class counts and the mask classes.

Packed sources (``data.source``) are packed on first use (``ensure_packed``: a verified cache) and
described by their manifest; URL-addressed shards (``data.urls``) have no manifest, so they carry
no class counts and no mask classes (the worker then bounds mask values by its seg head's C + 1).
Everything that needs the dataset (the trial, the workers, the evaluation, ``genrep-bench perf``)
takes this :class:`Dataset`: one place packs, with one set of pack settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.config import ConfigError

from .errors import DataError
from .manifest import load_manifest
from .pack import ensure_packed
from .stream import shard_urls

if TYPE_CHECKING:
    from harness.config import SweepConfig

SPLITS = ("train", "val", "test")
Urls = str | list[str]  # one brace pattern, or a list of shard URLs


@dataclass(frozen=True)
class Dataset:
    """Where a trial's data is and what it holds."""

    train: Urls
    val: Urls
    test: Urls
    cache: str  # the data root: packed shards, the reference classifier's cache
    key: str  # the reference classifier's cache key: the manifest's checksum, or the URLs' hash
    class_counts: tuple[int, ...] | None = None  # training split, from the manifest (mc.prior: train)
    mask_classes: int | None = None  # the manifest's mask.num_classes when data.masks
    manifest: str | None = None  # the manifest's path (None for data.urls)

    def plain(self) -> dict:
        """The fields as a plain mapping: how it crosses Ray (``Dataset(**plain)`` rebuilds it), so
        the Tune trainable, which only passes it on, never imports this package (torch, webdataset)."""
        return dataclasses.asdict(self)

    def urls(self, split: str) -> Urls:
        """The shard URLs of ``split`` (train, val or test)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits: {list(SPLITS)}")
        return getattr(self, split)


def data_root(sweep: SweepConfig) -> Path:
    """Where packed shards are cached: ``data.root`` or ``<output_dir>/../_data``."""
    root = sweep.data.root or str(Path(sweep.output_dir).parent / "_data")
    return Path(root).expanduser().resolve()


def url_patterns(urls: str | dict[str, str]) -> dict[str, str]:
    """Shard URL patterns per split from ``data.urls``: one pattern in which only ``{split}`` is
    replaced (``str.format`` would choke on brace ranges like ``{00000..00049}``), or a mapping
    split -> pattern when the splits have different shard counts."""
    if isinstance(urls, dict):
        return {s: urls[s] for s in SPLITS}
    return {s: urls.replace("{split}", s) for s in SPLITS}


def urls_key(urls: str | dict[str, str]) -> str:
    """A stable name for a URL-addressed dataset (the reference classifier's cache key)."""
    blob = json.dumps(urls, sort_keys=True).encode()
    return f"urls-{hashlib.sha256(blob).hexdigest()[:12]}"


def pack_params(sweep: SweepConfig) -> dict:
    """``ensure_packed``'s settings for the sweep's source: every one is part of its cache key."""
    d = sweep.data
    params = dict(shard_size=d.shard_size, image_size=d.image_size, split=d.split, seed=0)
    if d.count is not None:
        params["count"] = d.count
    if d.shapes_per_image is not None:  # null packs the source's default under its old key
        params["source_options"] = {"shapes_per_image": d.shapes_per_image}
    return params


def resolve_dataset(sweep: SweepConfig) -> Dataset:
    """Pack the dataset on first use (driver side) and describe it."""
    d, root = sweep.data, data_root(sweep)
    if d.urls:
        return Dataset(**url_patterns(d.urls), cache=str(root), key=urls_key(d.urls))
    manifest_path = ensure_packed(d.source, root, **pack_params(sweep))
    manifest = load_manifest(manifest_path)
    # the reference classifier's cache key: the manifest's checksum (it lists every shard's
    # sha256), so different data can never reuse a classifier trained on other data
    key = f"{manifest_path.parent.name}-{hashlib.sha256(manifest_path.read_bytes()).hexdigest()[:12]}"
    return Dataset(**{s: shard_urls(manifest, s) for s in SPLITS}, cache=str(root), key=key,
                   class_counts=tuple(manifest.splits["train"].class_counts),
                   mask_classes=mask_classes(sweep, manifest), manifest=str(manifest_path))


def mask_classes(sweep: SweepConfig, manifest) -> int | None:
    """The manifest's mask classes when ``data.masks`` (the loader's bound on mask values), checked
    against the seg head's C + 1 outputs; None without masks."""
    if not sweep.data.masks:
        return None
    try:
        k = manifest.require_mask().num_classes
    except DataError as e:
        raise ConfigError(f"{sweep.source_file}: data.masks: {e}") from None
    seg = sweep.trial(sweep.strategies[0], sweep.seeds[0]).model_config().seg_classes
    if k != seg:
        raise ConfigError(f"{sweep.source_file}: model.overrides.num_classes: the masks have {k} "
                          f"classes (background + {k - 1}), the seg head would give {seg}")
    return k
