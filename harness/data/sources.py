"""Image sources to pack: each gives (image uint8 [H, W, C], label) pairs, class names and masks.

Registered by name in a strict registry; `open_source("folder:/data/pets", ...)` splits the
prefix from its argument. Every source resizes to `image_size` so one shard set has one shape.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from genrep.registry import Registry

from .errors import DataError

SOURCES: Registry[Callable[..., "Source"]] = Registry("data source")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Source:
    """A sized, lazily loaded image source: `load(i) -> (image [H, W, C] uint8, mask or None)`.

    With `has_mask`, every mask is uint8 [H, W]: 0 background, c + 1 on pixels of class c."""

    name: str
    params: dict
    class_names: list[str]
    labels: np.ndarray  # (N,) int64, known up front so the split can be stratified
    channels: int
    load: Callable[[int], tuple[np.ndarray, np.ndarray | None]] = field(repr=False)
    has_mask: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self.load(i)[0], int(self.labels[i])


COMMON_PARAMS = {"arg", "image_size", "count", "seed"}  # every factory's; the rest are options


def open_source(spec: str, image_size: int = 16, count: int | None = None, seed: int = 0,
                options: dict | None = None) -> Source:
    """Build the source named by `spec` ("digits", "shapes", "folder:PATH", "npz:PATH").

    `options`: the source's own keyword parameters (shapes: `shapes_per_image`); one the source
    does not take is a DataError naming it and the ones it does."""
    name, _, arg = spec.partition(":")
    factory = SOURCES.get(name)
    known = set(inspect.signature(factory).parameters) - COMMON_PARAMS
    if unknown := sorted(set(options or {}) - known):
        raise DataError(f"data source {name!r}: unknown option(s) {unknown}; "
                        f"it takes {sorted(known) if known else 'none'}")
    return factory(arg or None, image_size=image_size, count=count, seed=seed, **(options or {}))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then bilinear-resize to `size`×`size`; keeps [H, W, C] uint8."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[top:top + s, left:left + s]
    if s != size:
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        image = np.asarray(pil.resize((size, size), Image.BILINEAR)).reshape(size, size, -1)
    return image


def _no_arg(name: str, arg: str | None) -> None:
    if arg:
        raise DataError(f"data source {name!r} takes no argument (got {arg!r})")


@SOURCES.register("digits")
def digits(arg: str | None, image_size: int = 16, count: int | None = None, seed: int = 0) -> Source:
    """scikit-learn's handwritten digits: 1,797 8×8 images with values 0..16, 10 classes."""
    from sklearn.datasets import load_digits

    _no_arg("digits", arg)
    data = load_digits()
    # 0..16 → 0..255 (×255/16, rounded) before the bilinear upscale
    small = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Source("digits", {}, [str(c) for c in data.target_names], data.target.astype(np.int64),
                  1, lambda i: (resize(small[i], image_size), None))


@SOURCES.register("npz")
def npz(arg: str | None, image_size: int = 16, count: int | None = None, seed: int = 0) -> Source:
    """A CIFAR-style .npz: `x` (N, H, W[, C]) uint8 and `y` (N,) integer labels."""
    if not arg:
        raise DataError("data source 'npz' needs a path: 'npz:/path/to/file.npz'")
    with np.load(arg) as f:
        if "x" not in f or "y" not in f:
            raise DataError(f"{arg}: needs arrays 'x' and 'y', found {sorted(f.files)}")
        x, y = f["x"], f["y"].astype(np.int64).reshape(-1)
    x = x[..., None] if x.ndim == 3 else x
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y) or x.shape[3] not in (1, 3):
        raise DataError(f"{arg}: x must be uint8 (N,H,W[,1|3]) matching y (N,); "
                        f"got x {x.dtype}{x.shape}, y {y.shape}")
    n_cls = int(y.max()) + 1 if len(y) else 0
    return Source("npz", {"path": str(Path(arg).resolve())}, [str(c) for c in range(n_cls)],
                  y, x.shape[3], lambda i: (resize(x[i], image_size), None))


@SOURCES.register("folder")
def folder(arg: str | None, image_size: int = 16, count: int | None = None, seed: int = 0) -> Source:
    """An image folder with one sub-folder per class (class index = sorted sub-folder order), RGB."""
    if not arg:
        raise DataError("data source 'folder' needs a path: 'folder:/path/to/images'")
    root = Path(arg)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root}: no class sub-folders found")
    files = [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]

    def load(i: int) -> tuple[np.ndarray, None]:
        with Image.open(files[i][0]) as im:
            return resize(np.asarray(im.convert("RGB")), image_size), None

    labels = np.array([c for _, c in files], dtype=np.int64)
    return Source("folder", {"path": str(root.resolve())}, classes, labels, 3, load)


# --- shapes: a procedural generator, deterministic per (seed, index) ---------------------------

SHAPES = ["circle", "square", "triangle", "plus", "ring", "diamond", "star", "hbar", "vbar", "x"]
SUPERSAMPLE = 4  # draw at 4× then box-filter, so small shapes keep their outline


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """Draw `shape` (filled, value 255) centred at (cx, cy) with radius r, in pixels."""
    box = [cx - r, cy - r, cx + r, cy + r]
    t = r / 3  # stroke half-width for bars and crosses
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=0)
    elif shape == "square":
        draw.rectangle([cx - .8 * r, cy - .8 * r, cx + .8 * r, cy + .8 * r], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for a, q in zip(angles, radii)], fill=255)
    elif shape in ("plus", "hbar"):
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
    if shape in ("plus", "vbar"):
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    if shape == "x":
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=255, width=max(1, int(2 * t)))
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=255, width=max(1, int(2 * t)))


MIN_PIXELS = 4  # mask pixels every shape must own, so each drawn class is really in the mask
SECONDARY_SCALE = 0.6  # secondary radii are 0.6× the primary's range: the primary is the largest
MAX_DRAWS = 100  # layouts tried before giving up (a clear error, not an image missing a class)


class Shape(NamedTuple):
    """One shape of a layout, in supersampled pixels: class index, centre, radius."""

    cls: int
    cx: float
    cy: float
    r: float


def shape_classes(rng: np.random.Generator, label: int, counts: tuple[int, int]) -> list[int]:
    """The classes of one image: `label` (the primary) first, then k − 1 *other* distinct classes,
    k drawn uniformly from the inclusive range `counts`. No draw at all for counts = (1, 1)."""
    lo, hi = counts
    k = int(rng.integers(lo, hi + 1)) if hi > lo else lo
    others = [c for c in range(len(SHAPES)) if c != label]
    return [label] + ([int(c) for c in rng.permutation(others)[:k - 1]] if k > 1 else [])


def shape_layout(rng: np.random.Generator, classes: list[int], big: int) -> list[Shape]:
    """Each class in its own cell of a g×g grid (g = ⌈√k⌉, cells drawn without replacement), so
    shapes never overlap. Radius r ~ U(0.25, 0.4)·cell side (secondaries ×0.6), centre uniform
    with the shape's box inside its cell. For k = 1 (one cell: the whole image) the draws are
    exactly those of the single-shape generator, so single-shape images are unchanged."""
    g = math.ceil(math.sqrt(len(classes)))
    side = big / g
    cells = rng.permutation(g * g)[:len(classes)] if g > 1 else [0]
    layout = []
    for j, (c, cell) in enumerate(zip(classes, cells)):
        row, col = divmod(int(cell), g)
        r = rng.uniform(0.25, 0.4) * side * (1.0 if j == 0 else SECONDARY_SCALE)
        dx, dy = rng.uniform(r, side - r, size=2)
        layout.append(Shape(c, col * side + dx, row * side + dy, r))
    return layout


def render_shapes(layout: list[Shape], size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-shape coverage [size, size] in 0..1 (drawn at SUPERSAMPLE×, box-filtered) and the class
    mask uint8 [size, size]: 0 where no shape, class + 1 where a shape's *visible* coverage (later
    shapes occlude earlier ones) is the largest and at least the background's. For one shape that
    is coverage ≥ 0.5."""
    covers = []
    for shape in layout:
        canvas = Image.new("L", (size * SUPERSAMPLE,) * 2, 0)
        _draw_shape(ImageDraw.Draw(canvas), SHAPES[shape.cls], shape.cx, shape.cy, shape.r)
        covers.append(np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0)
    visible, above = [], np.ones((size, size), np.float32)  # above: 1 − what later shapes cover
    for cover in reversed(covers):
        visible.insert(0, cover * above)
        above = above * (1 - cover)
    best = np.argmax(visible, axis=0)
    top = np.take_along_axis(np.stack(visible), best[None], 0)[0]
    ids = np.array([s.cls + 1 for s in layout], dtype=np.uint8)
    return covers, np.where(top >= above, ids[best], 0).astype(np.uint8)


def shape_sample(index: int, label: int, size: int, seed: int,
                 counts: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of primary class `label`: RGB image [size, size, 3] and class mask [size, size]
    (0 background, c + 1 on class c). A layout where some shape owns fewer than MIN_PIXELS mask
    pixels is redrawn (same rng stream: deterministic per (seed, index))."""
    rng = np.random.default_rng([seed, index])
    classes = shape_classes(rng, label, counts)
    for _ in range(MAX_DRAWS):
        covers, mask = render_shapes(shape_layout(rng, classes, size * SUPERSAMPLE), size)
        if all(np.count_nonzero(mask == c + 1) >= MIN_PIXELS for c in classes):
            break
    else:
        raise DataError(f"shapes: sample {index}: could not give each of {len(classes)} shapes "
                        f"{MIN_PIXELS} mask pixels in {MAX_DRAWS} layouts at image_size={size}; "
                        f"use a larger image_size or fewer shapes_per_image")
    # textured background: a muted 4×4 colour field upsampled, plus per-pixel noise
    field = Image.fromarray(rng.integers(20, 140, size=(4, 4, 3), dtype=np.uint8))
    image = np.asarray(field.resize((size, size), Image.BILINEAR), dtype=np.float32)
    image = image + rng.normal(0, 12, size=image.shape)
    for cover in covers:  # painter's order: each shape over what is below it
        colour = rng.integers(150, 256, size=3).astype(np.float32)
        image = image * (1 - cover[..., None]) + colour * cover[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def shape_counts(shapes_per_image: int | Sequence[int]) -> tuple[int, int]:
    """`shapes_per_image` as an inclusive (lo, hi): an int k is (k, k); 1 ≤ lo ≤ hi ≤ 10."""
    v = [shapes_per_image] if isinstance(shapes_per_image, int) else list(shapes_per_image)
    if not (1 <= len(v) <= 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and 1 <= v[0] <= v[-1] <= len(SHAPES)):
        raise DataError(f"data source 'shapes': shapes_per_image must be an int or [lo, hi] with "
                        f"1 <= lo <= hi <= {len(SHAPES)} (distinct classes), got {shapes_per_image!r}")
    return v[0], v[-1]


@SOURCES.register("shapes")
def shapes(arg: str | None, image_size: int = 16, count: int | None = None, seed: int = 0,
           shapes_per_image: int | Sequence[int] = 1) -> Source:
    """10 classes of bright shapes on textured backgrounds, with class masks; `count` samples
    (default 2,000). `shapes_per_image`: k, or an inclusive range [lo, hi], of shapes of distinct
    classes per image. The image's label is its primary shape's class (index mod 10, so classes
    stay balanced), the largest shape by radius; the others are drawn at 0.6× its size range."""
    _no_arg("shapes", arg)
    counts = shape_counts(shapes_per_image)
    n = 2000 if count is None else count
    labels = np.arange(n, dtype=np.int64) % len(SHAPES)  # balanced classes
    return Source("shapes", {"count": n, "seed": seed, "shapes_per_image": list(counts)},
                  list(SHAPES), labels, 3,
                  lambda i: shape_sample(i, int(labels[i]), image_size, seed, counts), has_mask=True)
