"""Pack a source into webdataset shards plus a manifest, byte-identically for identical arguments.

Shards are `{split}-{i:05d}.tar` holding `<key>.cls` (ASCII int), `<key>.png` and, for sources
with masks, `<key>.mask.png` (8-bit greyscale: 0 background, c + 1 on pixels of class c). Tars
are written by hand with mtime 0, uid/gid 0 and empty owner names (webdataset's TarWriter stamps
the current time), PNGs by PIL at a fixed compression.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
import shutil
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import atomic
from .errors import DataError
from .manifest import FORMAT, MASK_DTYPE, MASK_ENCODING, VERSION, sha256_file, verify
from .sources import Source, open_source

SPLITS = ("train", "val", "test")
PNG_LEVEL = 6  # fixed zlib level: PNG bytes depend only on pixels


def split_indices(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Stratified split: each class is permuted (seeded) and cut by `fractions`; each split is then
    shuffled so its shards mix classes. Returns one index array per split."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split must be {len(SPLITS)} non-negative fractions summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in SPLITS]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.rint(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [rng.permutation(np.concatenate(p)) if p else np.array([], int) for p in parts]


def png_bytes(array: np.ndarray) -> bytes:
    """PNG-encode an [H, W, C] or [H, W] uint8 array (C = 1 → greyscale)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=PNG_LEVEL, optimize=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, source: Source, indices: np.ndarray, bar: tqdm) -> dict:
    """Write one tar of the samples `indices` (in that order); returns its manifest entry."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in indices:
            image, mask = source.load(int(i))
            key = f"{int(i):07d}"  # the source index: unique, stable, traceable
            _add(tar, f"{key}.cls", str(int(source.labels[i])).encode("ascii"))
            if source.has_mask:
                _add(tar, f"{key}.mask.png", png_bytes(checked_mask(source, int(i), image, mask)))
            _add(tar, f"{key}.png", png_bytes(image))
            bar.update(1)
    return {"file": path.name, "count": len(indices), "sha256": sha256_file(path)}


def checked_mask(source: Source, index: int, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The source's mask for `index` if it is uint8 [H, W] (the image's) with values 0..C."""
    classes = len(source.class_names) + 1
    if (mask is None or mask.dtype != np.uint8 or mask.shape != image.shape[:2]
            or int(mask.max(initial=0)) >= classes):
        got = "None" if mask is None else f"{mask.dtype}{mask.shape} max {mask.max(initial=0)}"
        raise DataError(f"source {source.name!r} sample {index}: mask must be uint8 "
                        f"{image.shape[:2]} with values 0..{classes - 1}, got {got}")
    return mask


def pack(source: str, out_dir: str | os.PathLike, shard_size: int = 500, image_size: int = 16,
         split: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
         count: int | None = None, source_options: dict | None = None) -> Path:
    """Pack `source` into `out_dir` as train/val/test shards; returns the manifest path.

    `source_options`: the source's own parameters, e.g. {"shapes_per_image": [2, 3]} for shapes
    (sources.open_source); the manifest's `source_params` records their resolved values."""
    if shard_size < 1 or image_size < 1:
        raise DataError(f"shard_size and image_size must be >= 1, got {shard_size}, {image_size}")
    src = open_source(source, image_size=image_size, count=count, seed=seed, options=source_options)
    keep = np.arange(len(src))
    if count is not None and count < len(src):  # a seeded subset, kept in source order
        keep = np.sort(np.random.default_rng(seed).permutation(len(src))[:count])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    with tqdm(total=len(keep), desc=f"pack {source}", unit="img", disable=not sys.stderr.isatty()) as bar:
        for name, idx in zip(SPLITS, split_indices(src.labels[keep], tuple(split), seed)):
            idx = keep[idx]
            shards = [write_shard(out / f"{name}-{j:05d}.tar", src, idx[s:s + shard_size], bar)
                      for j, s in enumerate(range(0, len(idx), shard_size))]
            counts = np.bincount(src.labels[idx], minlength=len(src.class_names))
            splits[name] = {"count": len(idx), "class_counts": counts.tolist(), "shards": shards}
    manifest = {
        "format": FORMAT, "version": VERSION, "source": source, "source_params": src.params,
        "pack_params": {"shard_size": shard_size, "split": list(split), "seed": seed, "count": count},
        "image_size": image_size, "channels": src.channels, "num_classes": len(src.class_names),
        "class_names": src.class_names, "has_mask": src.has_mask, "mask": mask_entry(src),
        "splits": splits,
    }
    path = out / "manifest.json"
    atomic.write_text(path, json.dumps(manifest, indent=2) + "\n")  # readers never see half of it
    return path


def mask_entry(src: Source) -> dict | None:
    """The manifest's "mask": one greyscale PNG per image, 0 background and c + 1 for class c."""
    if not src.has_mask:
        return None
    return {"encoding": MASK_ENCODING, "dtype": MASK_DTYPE, "num_classes": len(src.class_names) + 1}


PACK_SIGNATURE = inspect.signature(pack)


def cache_key(source: str, **params) -> str:
    """Directory name for `pack(source, **params)`, defaults filled in: "<name>-<size>px-<hash>"."""
    bound = PACK_SIGNATURE.bind(source, None, **params)
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k != "out_dir"}
    args["split"] = list(args["split"])
    args["source_options"] = args["source_options"] or None  # {} and None: the same pack
    blob = json.dumps({"format": FORMAT, "version": VERSION, **args}, sort_keys=True)
    name = re.sub(r"[^A-Za-z0-9]+", "_", source.partition(":")[0])
    return f"{name}-{args['image_size']}px-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def ensure_packed(source: str, root: str | os.PathLike, **params) -> Path:
    """Pack once into a cache directory keyed by the parameters; return its manifest path.

    A cache packed earlier is verified on reuse (every shard against the manifest's sha256, one
    read of the shards per call): a damaged cache is a DataError naming the shard, never data
    silently different from what the key promises.

    Race-safe: each process packs into its own temp dir and renames it into place; a rename that
    loses (the directory now exists) discards its copy and uses the winner's."""
    root = Path(root)
    final = root / cache_key(source, **params)
    if (final / "manifest.json").is_file():
        return verified(final / "manifest.json")
    tmp = root / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        pack(source, tmp, **params)
        # Not harness.atomic: that replaces a *file* and would overwrite a winner's; this renames
        # a whole directory and must fail (ENOTEMPTY/EEXIST) when another process got there first
        os.rename(tmp, final)
    except OSError:
        if not (final / "manifest.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "manifest.json"


def verified(manifest: Path) -> Path:
    """``manifest`` once every shard it lists matches its checksum (``manifest.verify``)."""
    try:
        verify(manifest)
    except DataError as e:
        raise DataError(f"{e} (a damaged pack cache: delete {manifest.parent} to repack)") from e
    return manifest
