"""The shard manifest: load it with field-by-field validation, and verify shard checksums."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

FORMAT = "genrep-wds"
VERSION = 1


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
class Manifest:
    path: Path
    source: str
    source_params: dict
    pack_params: dict
    image_size: int
    channels: int
    num_classes: int
    class_names: list[str]
    has_mask: bool
    splits: dict[str, SplitInfo]

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
                 f("class_names", list), f("has_mask", bool), splits)
    if len(m.class_names) != m.num_classes:
        raise DataError(f"manifest {path}: field 'class_names' has {len(m.class_names)} names "
                        f"but 'num_classes' is {m.num_classes}")
    return m


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
