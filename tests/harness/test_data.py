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

from harness.data import (DataError, ensure_packed, load_manifest, make_loader, open_source, pack,
                          shard_urls, split_samples, verify)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """600 of the digits at 16 px in 100-sample shards: 480 train (5 shards), 60 val, 60 test."""
    return pack("digits", tmp_path_factory.mktemp("digits"), shard_size=100, count=600)


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

def test_pack_is_byte_identical(tmp_path):
    a, b = (pack("digits", tmp_path / d, shard_size=50, count=150, seed=1) for d in "ab")
    files = sorted(p.name for p in a.parent.iterdir())
    assert len(files) == 6 and files == sorted(p.name for p in b.parent.iterdir())
    for name in files:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name
    with tarfile.open(a.parent / "train-00000.tar") as t:
        assert {(i.mtime, i.uid, i.gid, i.uname, i.gname) for i in t.getmembers()} == {(0, 0, 0, "", "")}


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

def test_shapes_have_masks_and_ten_classes(tmp_path):
    m = load_manifest(pack("shapes", tmp_path, image_size=16, count=60, shard_size=20))
    assert m.num_classes == 10 and m.has_mask and m.channels == 3
    assert sum(m.split(s).count for s in m.splits) == 60
    with tarfile.open(m.shard_paths("train")[0]) as t:
        names = t.getnames()
        mask = np.asarray(Image.open(t.extractfile([n for n in names if n.endswith(".mask.png")][0])))
    assert len(names) == 3 * 20 and set(np.unique(mask)) == {0, 1}
    x, y = next(iter(make_loader(shard_urls(m, "train"), 8)))
    assert x.shape == (8, 3, 16, 16) and 0 <= int(y.min()) and int(y.max()) < 10
    src = open_source("shapes", image_size=16, count=10)
    a, b = src.load(3), open_source("shapes", image_size=16, count=10).load(3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[1].sum() > 10


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
