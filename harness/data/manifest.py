"""The shard manifest: load it with field-by-field validation, and verify shard checksums."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

FORMAT = "genrep-wds"
VERSION = 2  # 2: class masks (0 background, c + 1 class c) described by the "mask" field
MASK_ENCODING, MASK_DTYPE = "png", "uint8"


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the manifest's directory
    count: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    count: int
    class_counts: list[int]
    shards: list[ShardInfo]


@dataclass(frozen=True)
class MaskInfo:
    """How masks are stored: `<key>.mask.png`, 8-bit greyscale, values 0..num_classes − 1 where 0
    is the background and c + 1 is class c (so num_classes = C + 1 for C image classes)."""

    encoding: str
    dtype: str
    num_classes: int


@dataclass(frozen=True)
class Manifest:
    path: Path
    source: str
    source_params: dict
    pack_params: dict
    image_size: int
    channels: int
    num_classes: int
    class_names: list[str]
    mask: MaskInfo | None  # None: the shards carry no masks
    splits: dict[str, SplitInfo]

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    def require_mask(self) -> MaskInfo:
        """The mask description, or a DataError when this dataset has no masks."""
        if self.mask is None:
            raise DataError(f"manifest {self.path}: source {self.source!r} packs no masks "
                            f"(masks need a source with masks, e.g. shapes)")
        return self.mask

    @property
    def root(self) -> Path:
        return self.path.parent

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s.file for s in self.split(split).shards]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"{self.path}: no split {name!r}; has {sorted(self.splits)}")
        return self.splits[name]


def _field(obj: dict, key: str, kind: type | tuple, where: str, path: Path):
    """obj[key] checked for presence and type; the error names the file and the dotted field."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"manifest {path}: missing field {name!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"manifest {path}: field {name!r} has type {type(value).__name__}, "
                        f"expected {getattr(kind, '__name__', kind)}")
    return value


def _split(raw: dict, where: str, path: Path) -> SplitInfo:
    shards = []
    for i, s in enumerate(_field(raw, "shards", list, where, path)):
        w = f"{where}.shards[{i}]"
        shards.append(ShardInfo(_field(s, "file", str, w, path), _field(s, "count", int, w, path),
                                _field(s, "sha256", str, w, path)))
    split = SplitInfo(_field(raw, "count", int, where, path),
                      _field(raw, "class_counts", list, where, path), shards)
    if sum(s.count for s in shards) != split.count or sum(split.class_counts) != split.count:
        raise DataError(f"manifest {path}: field {where + '.count'!r} disagrees with shard or class counts")
    return split


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest.json; any problem raises DataError naming file and field."""
    path = Path(path).resolve()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"manifest {path}: cannot read JSON: {e}") from e
    f = lambda key, kind: _field(raw, key, kind, "", path)  # noqa: E731
    if (f("format", str), f("version", int)) != (FORMAT, VERSION):
        raise DataError(f"manifest {path}: field 'format'/'version' is {raw['format']!r} "
                        f"v{raw['version']}, expected {FORMAT!r} v{VERSION}")
    splits = {name: _split(s, f"splits.{name}", path) for name, s in f("splits", dict).items()}
    m = Manifest(path, f("source", str), f("source_params", dict), f("pack_params", dict),
                 f("image_size", int), f("channels", int), f("num_classes", int),
                 f("class_names", list), _mask(raw, f("has_mask", bool), path), splits)
    if len(m.class_names) != m.num_classes:
        raise DataError(f"manifest {path}: field 'class_names' has {len(m.class_names)} names "
                        f"but 'num_classes' is {m.num_classes}")
    if m.mask and m.mask.num_classes != m.num_classes + 1:
        raise DataError(f"manifest {path}: field 'mask.num_classes' is {m.mask.num_classes}, "
                        f"expected num_classes + 1 = {m.num_classes + 1} (background 0, class c as c + 1)")
    return m


def _mask(raw: dict, has_mask: bool, path: Path) -> MaskInfo | None:
    """The "mask" field: null without masks, else encoding "png", dtype "uint8", num_classes."""
    if "mask" not in raw:
        raise DataError(f"manifest {path}: missing field 'mask'")
    if (raw["mask"] is not None) != has_mask:
        raise DataError(f"manifest {path}: field 'mask' is {raw['mask']!r} but 'has_mask' is {has_mask}")
    if not has_mask:
        return None
    info = MaskInfo(*(_field(raw["mask"], k, kind, "mask", path)
                      for k, kind in (("encoding", str), ("dtype", str), ("num_classes", int))))
    if (info.encoding, info.dtype) != (MASK_ENCODING, MASK_DTYPE):
        raise DataError(f"manifest {path}: field 'mask' has encoding {info.encoding!r}, dtype "
                        f"{info.dtype!r}; expected {MASK_ENCODING!r}, {MASK_DTYPE!r}")
    return info


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(manifest_path: str | os.PathLike | Manifest) -> Manifest:
    """Check every shard exists and matches its sha256; raises DataError naming the shard."""
    m = manifest_path if isinstance(manifest_path, Manifest) else load_manifest(manifest_path)
    for split in m.splits.values():
        for shard in split.shards:
            p = m.root / shard.file
            if not p.is_file():
                raise DataError(f"shard {p}: missing (listed in {m.path})")
            if (digest := sha256_file(p)) != shard.sha256:
                raise DataError(f"shard {p}: sha256 {digest} does not match manifest {shard.sha256}")
    return m
