"""Streaming loader over webdataset shards: node × worker split, seeded shuffles, resume, bad data.

Splitting. Every reader — one (rank, DataLoader worker) pair, n = world_size · max(num_workers, 1)
of them — walks the *same* seeded shard order and keeps every n-th sample, starting at its own
index. That is exact (each sample once per epoch across the world, whatever the shard count) and
the expensive part, PNG decoding, happens after the split, so it is divided n ways; the price is
that every reader reads (not decodes) every tar byte, which is fine for a few small shards. The
shuffle buffer runs after the split, so it only reorders a reader's own samples.

Resampled mode draws shards with replacement, forever, seeded per reader; no exact split there.

Masks. With `masks=True` (and `mask_classes`, the manifest's `mask.num_classes`) each item is
(image, label, mask): the `.mask.png` must be 8-bit greyscale, exactly the image's H×W (images are
never resized on load, so neither are masks; a resize would have to be NEAREST) and hold values
0..mask_classes − 1. Without the flag a mask in the shard is ignored and items are (image, label).

Scarce labels. With `labelled_fraction` f < 1 only the samples whose key hashes below f (with
`label_seed`, `is_labelled`) keep their label; the others come with label −1 (and, with masks,
an all −1 mask). The choice is a function of the sample's key in the shard and the seed alone,
never of its position in the stream: the same images are labelled in every epoch, for every
loader seed, world size and worker count, and in every arm with the same `label_seed`. With
`label_noise` f > 0 (the positive control's known harm) a fraction f of the labelled samples,
again chosen by key and `label_seed` (`noisy_label`), carry another class's label instead.

Bad data. A tar that cannot be read raises DataError naming the shard URL; a sample without a
`.cls`, with a bad label, an undecodable image or (asked for) a missing or bad mask raises
DataError naming shard and key. With `on_bad_sample="skip"` each is recorded as a SkipRecord (sent
in-band from the workers) and counted in `loader.skipped` / `loader.skip_log`, never dropped
silently.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from .errors import DataError, SkipRecord
from .manifest import Manifest, load_manifest

POLICIES = ("raise", "skip")


def shard_urls(manifest: Manifest | str | os.PathLike, split: str, base: str | None = None) -> list[str]:
    """URLs of a split's shards. `base`: None (next to the manifest), a local dir, a `file://` or
    other URL prefix, or a template containing "{file}" such as "pipe:aws s3 cp s3://b/{file} -".
    A brace pattern string ("/data/train-{00000..00003}.tar") is expanded and returned as is."""
    if isinstance(manifest, str) and "{" in manifest and not manifest.endswith(".json"):
        return expand_urls(manifest)
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    files = [s.file for s in m.split(split).shards]
    if base is None:
        return [str(m.root / f) for f in files]
    if "{file}" in base:
        return [base.replace("{file}", f) for f in files]
    if base.startswith("pipe:"):
        raise DataError(f"a pipe: base needs a '{{file}}' placeholder, got {base!r}")
    if "://" in base:
        return [base.rstrip("/") + "/" + f for f in files]
    return [str(Path(base) / f) for f in files]


# --- pipeline stages: generators over samples, markers (SkipRecord) pass straight through ------

class _EndChecked:
    """A read-only stream wrapper that remembers the last 1 KiB read. tarfile's streaming reader
    ends quietly on a truncated archive, so completeness is checked here: a whole tar is a
    multiple of 512 bytes and ends with its end-of-archive marker (two zero blocks) or padding."""

    def __init__(self, raw):
        self.raw, self.size, self.tail = raw, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.size += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def complete(self) -> bool:
        while self.read(1 << 16):  # drain what tarfile left after the end marker
            pass
        return self.size % 512 == 0 and len(self.tail) == 1024 and not self.tail.strip(b"\0")

    def close(self) -> None:
        self.raw.close()


def shard_samples(url: str) -> Iterator[dict]:
    """Samples of one shard. The last is held back until the end-of-archive check passes: in a
    truncated tar it is the one cut short."""
    stream = _EndChecked(wds.gopen(url, "rb"))
    try:
        held = None
        for sample in group_by_keys(tar_file_expander([dict(url=url, stream=stream)])):
            if held is not None:
                yield held
            held = sample
        if not stream.complete():
            raise EOFError(f"truncated after {stream.size} bytes (no end-of-archive marker)")
        if held is not None:
            yield held
    finally:
        stream.close()


def read_shards(shards: Iterable[dict], policy: str) -> Iterator[dict | SkipRecord]:
    """Samples of each shard URL in turn; an unreadable or truncated shard → DataError naming it."""
    for shard in shards:
        url = shard["url"]
        try:
            yield from shard_samples(url)
        except Exception as e:  # tarfile.ReadError, EOFError, OSError, a failing pipe: ...
            err = f"unreadable shard ({type(e).__name__}: {e.args[0] if e.args else e})"
            if policy == "raise":
                raise DataError(f"shard {url}: {err}") from e
            yield SkipRecord(url, None, err)


def split_samples(samples: Iterable, index: int, count: int) -> Iterator:
    """Keep every `count`-th sample starting at `index` (reader `index` of `count`); markers from
    earlier stages are kept by reader 0 only, so each is reported once."""
    for i, s in enumerate(samples):
        if isinstance(s, SkipRecord):
            if index == 0:
                yield s
        elif i % count == index:
            yield s


def decode_sample(sample: dict, channels: int | None, size: int | None = None,
                  mask_classes: int | None = None) -> tuple:
    """(image uint8 [C, H, W], label), plus the mask uint8 [H, W] when `mask_classes` is given,
    from a raw sample; problems raise DataError with shard+key.

    Hostile shards: a member name that is absolute or climbs out (``../``) is refused (nothing is
    ever written, but such a key has no business in a dataset); only PNG is decoded; with `size`,
    the size declared in the PNG header is checked *before* pixels are allocated, so a header
    declaring 100000×100000 costs nothing (PIL's own DecompressionBombError is a second line)."""
    key = str(sample.get("__key__", ""))
    if key.startswith("/") or ".." in key.split("/"):
        raise _bad(sample, "unsafe member name (absolute or '..' path)")
    for ext in ("cls", "png"):
        if ext not in sample:
            raise _bad(sample, f"no .{ext} entry (has {sorted(k for k in sample if k[0] != '_')})")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(sample, f".cls is not an integer ({sample['cls'][:20]!r})") from e
    expect = None if size is None else (size, size, "the dataset's image_size")
    with _open_png(sample, "png", expect) as im:
        mode = {1: "L", 3: "RGB"}.get(channels or (1 if im.mode in ("L", "1", "I;16") else 3))
        array = np.asarray(im.convert(mode))
    image = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if mask_classes is None:
        return image, label
    return image, label, decode_mask(sample, image.shape[1], image.shape[2], mask_classes)


def decode_mask(sample: dict, height: int, width: int, mask_classes: int) -> np.ndarray:
    """The sample's class mask uint8 [H, W]: an 8-bit greyscale PNG of the image's size (checked
    in the header, before decoding) with values 0..mask_classes − 1."""
    if "mask.png" not in sample:
        raise _bad(sample, f"no .mask.png entry, but masks were asked for "
                           f"(has {sorted(k for k in sample if k[0] != '_')})")
    with _open_png(sample, "mask.png", (width, height, "the image's")) as im:
        if im.mode != "L":
            raise _bad(sample, f".mask.png has mode {im.mode!r}, expected 'L' (8-bit class indices)")
        mask = np.asarray(im)
    if (top := int(mask.max(initial=0))) >= mask_classes:
        raise _bad(sample, f".mask.png has value {top}, outside 0..{mask_classes - 1} "
                           f"({mask_classes} mask classes)")
    return mask


@contextmanager
def _open_png(sample: dict, ext: str, expect: tuple[int, int, str] | None) -> Iterator[Image.Image]:
    """Sample member `ext` opened as a PNG and loaded; with `expect` = (width, height, whose), a
    header declaring another size is refused before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(sample[ext]), formats=["PNG"]) as im:
            if expect is not None and im.size != expect[:2]:
                raise _bad(sample, f".{ext} declares {im.size[0]}x{im.size[1]} pixels, "
                                   f"expected {expect[0]}x{expect[1]} ({expect[2]})")
            im.load()
            yield im
    except DataError:
        raise
    except Exception as e:
        raise _bad(sample, f".{ext} is not a decodable image ({e})") from e


def _bad(sample: dict, reason: str) -> DataError:
    err = DataError(f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r}: {reason}")
    err.reason = reason
    return err


UNLABELLED = -1  # genrep.losses.UNLABELLED and genrep.dense.IGNORE: no label, no mask target


def is_labelled(key: str, fraction: float, seed: int) -> bool:
    """u(key) < f with u = the first 8 bytes of sha256("<seed>/<key>") as an integer / 2^64, a
    uniform draw in [0, 1) that depends on the sample's key and the seed only (so P(labelled) = f,
    and f = 1 labels every sample)."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def noisy_label(key: str, label: int, fraction: float, seed: int, classes: int) -> int:
    """The positive control's label: another class for a fraction f of the keys, else ``label``.

    From sha256("noise/<seed>/<key>") (a draw independent of :func:`is_labelled`'s): u = its first
    8 bytes / 2^64, v = its next 8 bytes as an integer; u < f flips y to (y + 1 + v mod (C − 1))
    mod C, uniform over the C − 1 other classes and never y itself. A function of the key and the
    seed alone, like :func:`is_labelled`: the same images carry the same wrong labels in every
    epoch, worker split, arm and training seed."""
    digest = hashlib.sha256(f"noise/{seed}/{key}".encode()).digest()
    if int.from_bytes(digest[:8], "little") / 2**64 >= fraction:
        return label
    return (label + 1 + int.from_bytes(digest[8:16], "little") % (classes - 1)) % classes


def unlabel(item: tuple) -> tuple:
    """(image, −1[, all −1 mask]): the sample without its label (int16 mask: −1 fits, and the batch
    stacks to int16 beside uint8 masks, then int64)."""
    image, _, *mask = item
    return (image, UNLABELLED, *(np.full(m.shape, UNLABELLED, np.int16) for m in mask))


def decode_all(samples: Iterable, channels: int | None, policy: str, size: int | None = None,
               mask_classes: int | None = None, labelled: tuple[float, int] | None = None,
               noise: tuple[float, int, int] | None = None) -> Iterator:
    """Decoded items; with ``labelled`` = (fraction, seed), samples not chosen by
    :func:`is_labelled` lose their label (and mask) here; with ``noise`` = (fraction, seed,
    classes), the labelled ones keep :func:`noisy_label`'s (masks untouched)."""
    for s in samples:
        if isinstance(s, SkipRecord):
            yield s
            continue
        try:
            item = decode_sample(s, channels, size, mask_classes)
            key = str(s.get("__key__", ""))
            if labelled is not None and not is_labelled(key, *labelled):
                item = unlabel(item)
            elif noise is not None:
                item = (item[0], noisy_label(key, int(item[1]), *noise), *item[2:])
            yield item
        except DataError as e:
            if policy == "raise":
                raise
            yield SkipRecord(s.get("__url__"), s.get("__key__"), e.reason)


def collate(items: Iterable, batch_size: int, drop_last: bool) -> Iterator:
    """Batches of (images float32 [B, C, H, W] in [-1, 1], labels int64 [B]) and, when items carry
    masks, masks int64 [B, H, W] (cross-entropy targets); markers pass through."""
    batch: list[tuple] = []
    for item in items:
        if isinstance(item, SkipRecord):
            yield item
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield _to_batch(batch)
            batch = []
    if batch and not drop_last:
        yield _to_batch(batch)


def _to_batch(batch: list[tuple]) -> tuple[torch.Tensor, ...]:
    images, labels, *masks = zip(*batch)
    x = torch.from_numpy(np.stack(images)).float().div_(127.5).sub_(1.0)  # uint8 0..255 → [-1, 1]
    y = torch.tensor(labels, dtype=torch.int64)
    return (x, y, torch.from_numpy(np.stack(masks[0])).long()) if masks else (x, y)


# --- one reader's pipeline, built inside the DataLoader worker ---------------------------------

def _reader_seed(seed: int, epoch: int, reader: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_007 + reader


class _ReaderStream(IterableDataset):
    """The wds.DataPipeline for one reader; holds only plain config so it pickles to workers."""

    def __init__(self, urls: list[str], cfg: dict):
        super().__init__()
        self.urls, self.cfg = urls, cfg

    def __iter__(self) -> Iterator:
        c, info = self.cfg, get_worker_info()
        workers = info.num_workers if info else 1
        reader = c["rank"] * workers + (info.id if info else 0)
        n_readers = c["world_size"] * workers
        return iter(wds.DataPipeline(*self._stages(reader, n_readers)))

    def _stages(self, reader: int, n_readers: int) -> list:
        c = self.cfg
        stages: list = []
        if c["resampled"]:  # with replacement, forever; each reader its own seeded draw
            rng = random.Random(_reader_seed(c["seed"], c["epoch"], reader))
            stages += [lambda: _resample(self.urls, rng), lambda s: read_shards(s, c["policy"])]
        else:  # same shard order on every reader, then every n-th sample
            urls = list(self.urls)
            if c["shuffle_shards"]:
                random.Random(_reader_seed(c["seed"], c["epoch"], 0)).shuffle(urls)
            stages += [wds.SimpleShardList(urls), lambda s: read_shards(s, c["policy"]),
                       lambda s: split_samples(s, reader, n_readers)]
        if c["shuffle_buffer"] > 1:
            stages.append(wds.shuffle(c["shuffle_buffer"], initial=c["shuffle_buffer"],
                                      seed=_reader_seed(c["seed"], c["epoch"], reader)))
        stages += [lambda s: decode_all(s, c["channels"], c["policy"], c.get("image_size"),
                                        c.get("mask_classes"), c.get("labelled"), c.get("noise")),
                   lambda s: collate(s, c["batch_size"], c["drop_last"])]
        return stages


def _resample(urls: list[str], rng: random.Random) -> Iterator[dict]:
    while True:
        yield dict(url=rng.choice(urls))


def _identity(x):
    return x


class ShardLoader:
    """Iterable of (images, labels) batches — (images, labels, masks) with masks on — over shard
    URLs; see the module docstring.

    Position: `state_dict()` holds the epoch and batches consumed; after `load_state_dict`, the
    next iteration replays the same order and skips that many batches. A full pass advances the
    epoch (reseeding shard order and shuffle buffer); `set_epoch` sets it explicitly."""

    def __init__(self, urls: list[str], cfg: dict, num_workers: int):
        self.urls, self.cfg, self.num_workers = urls, cfg, num_workers
        self.epoch, self.batches = cfg["epoch"], 0
        self.skip_log: list[SkipRecord] = []

    @property
    def skipped(self) -> int:
        return len(self.skip_log)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches,
                "skip_log": [list(r) for r in self.skip_log]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.skip_log = [SkipRecord(*r) for r in state.get("skip_log", [])]

    def _items(self) -> Iterable:
        ds = _ReaderStream(self.urls, {**self.cfg, "epoch": self.epoch})
        if self.num_workers == 0:
            return ds
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        done = 0
        for item in self._items():
            if isinstance(item, SkipRecord):
                if done >= self.batches:  # already logged before a resume
                    self.skip_log.append(SkipRecord(*item))
                continue
            done += 1
            if done <= self.batches:  # fast-forward to the saved position
                continue
            self.batches = done
            yield item
        self.epoch, self.batches = self.epoch + 1, 0


def make_loader(urls: str | list[str], batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 0,
                resampled: bool = False, on_bad_sample: str = "raise", image_channels: int | None = None,
                drop_last: bool = True, shuffle_shards: bool = True,
                image_size: int | None = None, masks: bool = False,
                mask_classes: int | None = None, labelled_fraction: float = 1.0,
                label_seed: int = 0, label_noise: float = 0.0,
                num_classes: int | None = None) -> ShardLoader:
    """A ShardLoader over `urls` (a list, or one brace pattern) for reader `rank` of `world_size`;
    with `image_size`, an image of any other size is bad data (DataError naming shard and key).

    `masks=True`: batches are (images, labels, masks int64 [B, H, W]); `mask_classes` is the
    manifest's `mask.num_classes` (`Manifest.require_mask()`), the bound on mask values.

    `labelled_fraction` f < 1: only the samples :func:`is_labelled` picks (by key and
    `label_seed`) keep their label; the others have label −1 and an all −1 mask (training only:
    a held-out split is never unlabelled). `label_noise` f > 0 (the positive control): a fraction
    f of those labelled samples get another of `num_classes` classes (:func:`noisy_label`)."""
    urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
    if masks and (not isinstance(mask_classes, int) or not 2 <= mask_classes <= 256):
        raise ValueError(f"masks=True needs mask_classes, an int in 2..256 (the manifest's "
                         f"mask.num_classes), got {mask_classes!r}")
    if not 0 < labelled_fraction <= 1:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction!r}")
    if not 0 <= label_noise < 1 or (label_noise and not (isinstance(num_classes, int) and num_classes >= 2)):
        raise ValueError(f"label_noise must be in [0, 1) and needs num_classes >= 2, got "
                         f"{label_noise!r}, {num_classes!r}")
    if image_channels not in (None, 1, 3):
        raise ValueError(f"image_channels must be None, 1 or 3, got {image_channels!r}")
    if on_bad_sample not in POLICIES:
        raise ValueError(f"on_bad_sample must be one of {POLICIES}, got {on_bad_sample!r}")
    if not urls or not 0 <= rank < world_size or batch_size < 1 or num_workers < 0:
        raise ValueError(f"bad loader arguments: {len(urls)} urls, rank {rank} of {world_size}, "
                         f"batch_size {batch_size}, num_workers {num_workers}")
    cfg = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
               shuffle_buffer=shuffle_buffer, resampled=resampled, policy=on_bad_sample,
               channels=image_channels, drop_last=drop_last, shuffle_shards=shuffle_shards,
               image_size=image_size, mask_classes=mask_classes if masks else None,
               labelled=(labelled_fraction, label_seed) if labelled_fraction < 1 else None,
               noise=(label_noise, label_seed, num_classes) if label_noise else None)
    return ShardLoader(urls, cfg, num_workers)
