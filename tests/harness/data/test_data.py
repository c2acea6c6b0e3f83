"""harness.data: pack → manifest → verify → stream, splits, determinism, bad data, sources."""
from __future__ import annotations

import importlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import (DataError, MaskInfo, ensure_packed, load_manifest, make_loader, open_source,
                          pack, shard_urls, split_samples, verify)
from harness.data.pack import cache_key
from harness.data.sources import Shape, render_shapes

MULTI = {"shapes_per_image": [2, 3]}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """600 of the digits at 16 px in 100-sample shards: 480 train (5 shards), 60 val, 60 test."""
    return pack("digits", tmp_path_factory.mktemp("digits"), shard_size=100, count=600)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """40 single-shape images at 16 px: 30 train, 10 val, 0 test, in 10-sample shards."""
    return pack("shapes", tmp_path_factory.mktemp("shapes"), shard_size=10, count=40)


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    """30 images at 32 px with 2 or 3 shapes of distinct classes each."""
    return pack("shapes", tmp_path_factory.mktemp("multi"), image_size=32, shard_size=10, count=30,
                source_options=MULTI)


def copy_pack(manifest: Path, dest: Path) -> Path:
    shutil.copytree(manifest.parent, dest)
    return dest / manifest.name


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo the [-1, 1] scaling: [B, C, H, W] float → [B, H, W, C] uint8."""
    return torch.round((x + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_all(loader) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*loader)
    return to_uint8(torch.cat(xs)), torch.cat(ys).numpy()


def multiset(images: np.ndarray, labels: np.ndarray) -> Counter:
    return Counter((int(y), x.tobytes()) for x, y in zip(images, labels))


def tar_keys(paths) -> list[int]:
    keys = []
    for p in paths:
        with tarfile.open(p) as t:
            keys += [int(n.split(".")[0]) for n in t.getnames() if n.endswith(".cls")]
    return keys


def exact_loader(urls, **kw):
    """Pack order: no shard shuffle, no buffer, keep the last partial batch."""
    return make_loader(urls, 64, shuffle_shards=False, drop_last=False, **kw)


# --- round trip ----------------------------------------------------------------------------------

def test_round_trip_returns_packed_images_and_labels(digits):
    m = verify(digits)
    assert (m.num_classes, m.channels, m.image_size, len(m.split("train").shards)) == (10, 1, 16, 5)
    assert [m.split(s).count for s in ("train", "val", "test")] == [480, 60, 60]
    src = open_source("digits", image_size=16)
    for split in ("train", "val", "test"):
        images, labels = read_all(exact_loader(shard_urls(m, split)))
        keys = tar_keys(m.shard_paths(split))  # source indices, in pack order
        assert len(keys) == m.split(split).count == len(labels)
        np.testing.assert_array_equal(labels, src.labels[keys])
        np.testing.assert_array_equal(images, np.stack([src.load(k)[0] for k in keys]))
    assert np.bincount(labels, minlength=10).tolist() == m.split("test").class_counts


def test_batches_are_scaled_float_and_int64_labels(digits):
    x, y = next(iter(make_loader(shard_urls(digits, "val"), 32)))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    x3, _ = next(iter(make_loader(shard_urls(digits, "val"), 4, image_channels=3)))
    assert x3.shape == (4, 3, 16, 16)


def test_shard_urls_bases_and_brace_patterns(digits):
    assert shard_urls(digits, "val", base="/data") == ["/data/val-00000.tar"]
    assert shard_urls(digits, "val", base="file:///data/") == ["file:///data/val-00000.tar"]
    assert shard_urls(digits, "val", base="pipe:cat /b/{file}") == ["pipe:cat /b/val-00000.tar"]
    assert shard_urls("/d/train-{00000..00002}.tar", "train") == [f"/d/train-0000{i}.tar" for i in range(3)]
    with pytest.raises(DataError, match="placeholder"):
        shard_urls(digits, "val", base="pipe:cat")
    pipe = exact_loader(shard_urls(digits, "val", base=f"pipe:cat {digits.parent}/{{file}}"))
    file = exact_loader(shard_urls(digits, "val", base=f"file://{digits.parent}"))
    np.testing.assert_array_equal(read_all(pipe)[1], read_all(file)[1])


# --- splitting across nodes and workers ----------------------------------------------------------

def test_split_samples_partitions_the_stream():
    parts = [list(split_samples(range(103), i, 4)) for i in range(4)]
    assert sorted(sum(parts, [])) == list(range(103))


def test_node_by_worker_split_covers_every_sample_once(digits):
    urls = shard_urls(digits, "val") + shard_urls(digits, "test")  # 120 samples, 2 shards
    world = [read_all(make_loader(urls, 16, rank=r, world_size=2, num_workers=2, seed=3,
                                  shuffle_buffer=20, drop_last=False)) for r in range(2)]
    images = np.concatenate([w[0] for w in world])
    labels = np.concatenate([w[1] for w in world])
    assert len(labels) == 120
    assert multiset(images, labels) == multiset(*read_all(exact_loader(urls)))


# --- determinism -----------------------------------------------------------------------------------

@pytest.mark.parametrize("source, options, members", [
    ("digits", None, ("cls", "png")),
    ("shapes", MULTI, ("cls", "mask.png", "png")),  # masks and multi-shape layouts too
])
def test_pack_is_byte_identical(tmp_path, source, options, members):
    a, b = (pack(source, tmp_path / d, shard_size=50, count=150, seed=1, source_options=options)
            for d in "ab")
    files = sorted(p.name for p in a.parent.iterdir())
    assert len(files) == 6 and files == sorted(p.name for p in b.parent.iterdir())
    for name in files:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name
    with tarfile.open(a.parent / "train-00000.tar") as t:
        assert {(i.mtime, i.uid, i.gid, i.uname, i.gname) for i in t.getmembers()} == {(0, 0, 0, "", "")}
        assert Counter(n.split(".", 1)[1] for n in t.getnames()) == {m: 50 for m in members}
    other = pack(source, tmp_path / "c", shard_size=50, count=150, seed=2, source_options=options)
    assert (other.parent / "train-00000.tar").read_bytes() != (a.parent / "train-00000.tar").read_bytes()


def test_same_seed_same_order_other_seed_or_epoch_differs(digits):
    urls = shard_urls(digits, "train")

    def labels(seed, epoch=0):
        loader = make_loader(urls, 32, seed=seed, epoch=epoch, shuffle_buffer=100)
        return torch.cat([b[1] for _, b in zip(range(4), loader)]).tolist()

    assert labels(0) == labels(0)
    assert labels(0) != labels(1)
    assert labels(0) != labels(0, epoch=1)


def test_resume_continues_where_it_stopped(digits):
    urls = shard_urls(digits, "train")
    full = [y for _, y in make_loader(urls, 32, seed=5, shuffle_buffer=50)]
    first = make_loader(urls, 32, seed=5, shuffle_buffer=50)
    it = iter(first)
    head = [next(it)[1] for _ in range(3)]
    state = first.state_dict()
    assert state["batches"] == 3 and state["epoch"] == 0
    second = make_loader(urls, 32, seed=5, shuffle_buffer=50)
    second.load_state_dict(state)
    rest = [y for _, y in second]
    assert torch.equal(torch.cat(head + rest), torch.cat(full))
    assert second.state_dict()["epoch"] == 1


# --- bad data ------------------------------------------------------------------------------------

def test_truncated_shard_raises_naming_the_shard(digits, tmp_path):
    m = load_manifest(copy_pack(digits, tmp_path / "p"))
    bad = m.shard_paths("train")[1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=bad.name):
        read_all(exact_loader(shard_urls(m, "train")))
    skip = exact_loader(shard_urls(m, "train"), on_bad_sample="skip")
    _, labels = read_all(skip)
    assert skip.skipped == 1 and skip.skip_log[0].shard.endswith(bad.name) and skip.skip_log[0].key is None
    assert 480 - 100 <= len(labels) < 480
    with pytest.raises(DataError, match=bad.name):
        verify(m)


def test_checksum_mismatch_and_missing_shard(digits, tmp_path):
    path = copy_pack(digits, tmp_path / "p")
    shard = path.parent / "val-00000.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="val-00000.tar.*sha256"):
        verify(path)
    shard.unlink()
    with pytest.raises(DataError, match="val-00000.tar: missing"):
        verify(path)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def test_bad_samples_raise_or_are_skipped_and_counted(tmp_path):
    png = io.BytesIO()
    Image.new("L", (4, 4), 7).save(png, format="PNG")
    url = write_tar(tmp_path / "bad.tar", [
        ("a.cls", b"1"), ("a.png", png.getvalue()),
        ("nolabel.png", png.getvalue()),
        ("junk.cls", b"2"), ("junk.png", b"not a png"),
        ("b.cls", b"3"), ("b.png", png.getvalue()),
    ])
    with pytest.raises(DataError, match=r"bad.tar: sample 'nolabel'.*no \.cls"):
        read_all(exact_loader([url]))
    loader = exact_loader([url], on_bad_sample="skip")
    _, labels = read_all(loader)
    assert labels.tolist() == [1, 3]
    assert loader.skipped == 2
    assert [(r.key, r.shard) for r in loader.skip_log] == [("nolabel", url), ("junk", url)]
    assert "decodable" in loader.skip_log[1].reason


def test_manifest_validation_names_file_and_field(digits, tmp_path):
    raw = json.loads(digits.read_text())
    del raw["splits"]["train"]["shards"][0]["sha256"]
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"manifest .*manifest.json: missing field 'splits.train.shards\[0\].sha256'"):
        load_manifest(bad)


# --- sources ----------------------------------------------------------------------------------------

def test_shapes_have_class_masks_and_ten_classes(shapes):
    m = load_manifest(shapes)
    assert m.num_classes == 10 and m.channels == 3 and m.has_mask
    assert m.mask == MaskInfo("png", "uint8", 11) and m.source_params["shapes_per_image"] == [1, 1]
    assert json.loads(shapes.read_text())["mask"] == {"encoding": "png", "dtype": "uint8", "num_classes": 11}
    with tarfile.open(m.shard_paths("train")[0]) as t:
        names = t.getnames()
        key = names[0].split(".")[0]
        label = int(t.extractfile(f"{key}.cls").read())
        mask = np.asarray(Image.open(t.extractfile(f"{key}.mask.png")))
    assert len(names) == 3 * 10 and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, label + 1}
    x, y = next(iter(make_loader(shard_urls(m, "train"), 8)))  # no flag: (images, labels) as before
    assert x.shape == (8, 3, 16, 16) and 0 <= int(y.min()) and int(y.max()) < 10
    src = open_source("shapes", image_size=16, count=10)
    a, b = src.load(3), open_source("shapes", image_size=16, count=10).load(3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and (a[1] > 0).sum() > 10


@pytest.mark.parametrize("which", ["shapes", "multi"])
def test_masks_round_trip_through_pack_and_stream(which, request):
    """Streamed masks are the source's masks, key by key, values 0..C, the label's class present."""
    m = load_manifest(request.getfixturevalue(which))
    src = open_source("shapes", image_size=m.image_size, count=m.source_params["count"],
                      options={"shapes_per_image": m.source_params["shapes_per_image"]})
    for split in (s for s in m.splits if m.split(s).count):
        loader = exact_loader(shard_urls(m, split), masks=True, mask_classes=m.require_mask().num_classes)
        images, labels, masks = (torch.cat(parts) for parts in zip(*loader))
        images, labels = to_uint8(images), labels.numpy()
        keys = tar_keys(m.shard_paths(split))
        assert masks.dtype == torch.int64 and masks.shape == (len(keys), m.image_size, m.image_size)
        np.testing.assert_array_equal(images, np.stack([src.load(k)[0] for k in keys]))
        np.testing.assert_array_equal(masks.numpy(), np.stack([src.load(k)[1] for k in keys]))
        np.testing.assert_array_equal(labels, src.labels[keys])
        assert 0 <= int(masks.min()) and int(masks.max()) <= 10
        for y, mask in zip(labels, masks):
            present = set(mask.unique().tolist()) - {0}
            assert y + 1 in present and 0 in set(mask.unique().tolist())  # background is there too
            assert len(present) >= (2 if which == "multi" else 1) and (which == "multi" or present == {y + 1})
    # two ranks × two DataLoader workers: every (label, mask) once, masks travel with their images
    world = [list(make_loader(shard_urls(m, "train"), 4, rank=r, world_size=2, num_workers=2,
                              drop_last=False, masks=True, mask_classes=11)) for r in range(2)]
    got = Counter((int(y), mask.numpy().tobytes()) for w in world for b in w for y, mask in zip(b[1], b[2]))
    keys = tar_keys(m.shard_paths("train"))
    assert got == Counter((int(src.labels[k]), src.load(k)[1].astype(np.int64).tobytes()) for k in keys)


def test_mask_is_the_shape_and_zero_elsewhere():
    """Hand-computed: a square (class 1) of radius 20 at (32, 32) in the 4× canvas spans canvas
    pixels 16..48 (0.8·r = 16 each side), i.e. image pixels 4..11 fully; pixel 12 is a quarter
    covered (64/255 after the box filter: < 0.5). So mask = 2 on [4:12, 4:12] and 0 everywhere else."""
    covers, mask = render_shapes([Shape(1, 32.0, 32.0, 20.0)], 16)
    want = np.zeros((16, 16), np.uint8)
    want[4:12, 4:12] = 2
    np.testing.assert_array_equal(mask, want)
    assert covers[0][4:12, 4:12].min() == 1.0 and covers[0][12, 4:12].max() == pytest.approx(64 / 255)
    # a later shape (hbar, class 7) drawn over it takes the pixels it covers; the rest stays 2
    _, over = render_shapes([Shape(1, 32.0, 32.0, 20.0), Shape(7, 32.0, 32.0, 12.0)], 16)
    assert set(np.unique(over)) == {0, 2, 8} and (over == 0).sum() == (want == 0).sum()
    assert over[8, 8] == 8 and over[4, 4] == 2


def test_multi_shape_images_have_distinct_classes_and_the_label_is_the_largest():
    src = open_source("shapes", image_size=32, count=40, seed=4, options={"shapes_per_image": [2, 4]})
    sizes = Counter()
    for i in range(len(src)):
        image, mask = src.load(i)
        present = set(np.unique(mask).tolist()) - {0}
        sizes[len(present)] += 1
        assert int(src.labels[i]) + 1 in present and 2 <= len(present) <= 4
    assert set(sizes) == {2, 3, 4}
    assert np.bincount(src.labels).tolist() == [4] * 10  # the label stays balanced
    two = open_source("shapes", image_size=16, count=10, options={"shapes_per_image": 2})
    assert all(len(set(np.unique(two.load(i)[1]).tolist()) - {0}) == 2 for i in range(10))


@pytest.mark.parametrize("spec, options, words", [
    ("shapes", {"shapes_per_image": 0}, "shapes_per_image must be"),
    ("shapes", {"shapes_per_image": [3, 2]}, "shapes_per_image must be"),
    ("shapes", {"shapes_per_image": 11}, "shapes_per_image must be"),
    ("shapes", {"shapes_per_image": True}, "shapes_per_image must be"),
    ("shapes", {"multi": True}, r"unknown option\(s\) \['multi'\]; it takes \['shapes_per_image'\]"),
    ("digits", {"shapes_per_image": 2},
     r"'digits': unknown option\(s\) \['shapes_per_image'\]; it takes none"),
])
def test_bad_source_options_are_refused(spec, options, words):
    with pytest.raises(DataError, match=words):
        open_source(spec, options=options)


def test_pack_refuses_a_source_mask_out_of_range(tmp_path, monkeypatch):
    sources = importlib.import_module("harness.data.sources")
    real = sources.shape_sample

    def bad(index, *args):
        image, mask = real(index, *args)
        return image, (mask + 11 if index == 7 else mask)

    monkeypatch.setattr(sources, "shape_sample", bad)
    with pytest.raises(DataError, match=r"source 'shapes' sample 7: mask must be uint8 \(16, 16\) "
                                        r"with values 0\.\.10, got uint8\(16, 16\) max 1\d"):
        pack("shapes", tmp_path, count=20)


def test_source_options_key_the_cache():
    assert cache_key("shapes", source_options=MULTI) != cache_key("shapes")
    assert cache_key("shapes", source_options={}) == cache_key("shapes")


def test_masks_asked_of_a_source_without_them(digits):
    m = load_manifest(digits)
    assert m.mask is None and not m.has_mask and json.loads(digits.read_text())["mask"] is None
    with pytest.raises(DataError, match=rf"manifest {m.path}: source 'digits' packs no masks"):
        m.require_mask()
    with pytest.raises(DataError, match=r"val-00000.tar: sample '\d{7}': no \.mask\.png entry"):
        read_all(exact_loader(shard_urls(m, "val"), masks=True, mask_classes=11))
    with pytest.raises(ValueError, match="mask_classes"):
        make_loader(shard_urls(m, "val"), 8, masks=True)


def rewrite_member(shard: Path, name: str, data: bytes) -> None:
    """Replace one member of a tar in place, keeping the others and their order."""
    with tarfile.open(shard) as t:
        members = [(i, t.extractfile(i).read()) for i in t.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as t:
        for info, payload in members:
            payload = data if info.name == name else payload
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("mask, words", [
    (np.full((16, 16), 11, np.uint8), r"\.mask\.png has value 11, outside 0\.\.10 \(11 mask classes\)"),
    (np.zeros((8, 16), np.uint8), r"\.mask\.png declares 16x8 pixels, expected 16x16 \(the image's\)"),
], ids=["out-of-range", "wrong-size"])
def test_a_corrupt_mask_in_a_packed_shard_names_shard_and_key(shapes, tmp_path, mask, words):
    m = load_manifest(copy_pack(shapes, tmp_path / "p"))
    shard = m.shard_paths("train")[1]
    with tarfile.open(shard) as t:
        key = t.getnames()[4].split(".")[0]  # the second sample
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    rewrite_member(shard, f"{key}.mask.png", buf.getvalue())
    urls = shard_urls(m, "train")
    with pytest.raises(DataError, match=rf"shard {shard}: sample '{key}': {words}"):
        read_all(exact_loader(urls, masks=True, mask_classes=11))
    skip = exact_loader(urls, masks=True, mask_classes=11, on_bad_sample="skip")
    assert sum(len(b[1]) for b in skip) == 29
    assert [(r.shard, r.key) for r in skip.skip_log] == [(str(shard), key)]
    assert len(read_all(exact_loader(urls))[1]) == 30  # without the flag the mask is not read


@pytest.mark.parametrize("edit, words", [
    (lambda r: r["mask"].update(num_classes=12), "'mask.num_classes' is 12, expected num_classes \\+ 1 = 11"),
    (lambda r: r.update(mask=None), "field 'mask' is None but 'has_mask' is True"),
    (lambda r: r["mask"].update(encoding="jpeg"), "encoding 'jpeg'"),
    (lambda r: r["mask"].pop("dtype"), "missing field 'mask.dtype'"),
])
def test_manifest_mask_field_is_validated(shapes, tmp_path, edit, words):
    raw = json.loads(shapes.read_text())
    edit(raw)
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=f"manifest {bad}: .*{words}"):
        load_manifest(bad)


def round_trip(spec: str, out: Path, images: np.ndarray, labels: np.ndarray) -> None:
    m = load_manifest(pack(spec, out, shard_size=8, split=(1.0, 0.0, 0.0)))
    assert m.split("val").count == 0 and len(m.split("train").shards) == 3
    got = read_all(exact_loader(shard_urls(m, "train")))
    assert multiset(*got) == multiset(images, labels)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8), np.arange(20) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    round_trip(f"npz:{tmp_path / 'd.npz'}", tmp_path / "out", x, y)


def test_folder_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (18, 16, 16, 3), dtype=np.uint8), np.arange(18) % 2
    for i, (img, c) in enumerate(zip(x, y)):
        (tmp_path / "imgs" / ["cat", "dog"][c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / ["cat", "dog"][c] / f"{i}.png")
    round_trip(f"folder:{tmp_path / 'imgs'}", tmp_path / "out", x, y)
    assert load_manifest(tmp_path / "out" / "manifest.json").class_names == ["cat", "dog"]


def test_unknown_source_lists_known_names():
    with pytest.raises(KeyError, match="digits"):
        open_source("nope")


# --- cache --------------------------------------------------------------------------------------

def test_ensure_packed_caches_and_survives_a_lost_race(tmp_path, monkeypatch):
    kw = dict(count=60, shard_size=30)
    path = ensure_packed("shapes", tmp_path, **kw)
    assert path.parent.name.startswith("shapes-16px-")
    assert ensure_packed("shapes", tmp_path, image_size=16, **kw) == path  # defaults fill the key
    pack_mod = importlib.import_module("harness.data.pack")
    real_pack = pack_mod.pack

    def racing_pack(source, out_dir, **params):  # another process finishes first
        monkeypatch.setattr(pack_mod, "pack", real_pack)
        ensure_packed(source, tmp_path / "race", **params)
        return real_pack(source, out_dir, **params)

    monkeypatch.setattr(pack_mod, "pack", racing_pack)
    winner = ensure_packed("shapes", tmp_path / "race", **{**kw, "seed": 2})
    assert verify(winner) and [p.name for p in (tmp_path / "race").iterdir()] == [winner.parent.name]


def test_a_reused_pack_cache_is_verified(tmp_path):
    """ensure_packed checks a cache it did not just pack against the manifest's sha256."""
    path = ensure_packed("shapes", tmp_path, count=60, shard_size=30)
    assert ensure_packed("shapes", tmp_path, count=60, shard_size=30) == path  # intact: reused
    shard = path.parent / "train-00000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # one flipped byte inside the first member
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {shard}: sha256 .* delete {path.parent} to repack"):
        ensure_packed("shapes", tmp_path, count=60, shard_size=30)
