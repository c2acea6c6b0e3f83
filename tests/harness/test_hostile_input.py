"""Hostile or broken input: each is a clear error naming what and where, and nothing is written.

Complements tests/harness/config/test_config.py (unknown keys, wrong types, bad ranges, malformed and
unsafe YAML) and tests/harness/data/test_data.py (truncated shards, bad checksums, missing labels,
non-image payloads, a corrupt mask in a packed shard): only what those do not cover is here
(hostile image and mask payloads: bombs, wrong sizes and modes, out-of-range class values).
The network exposure of the embedded Ray cluster is at the end (slow: it starts Ray).
"""
from __future__ import annotations

import io
import os
import resource
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

from harness.cli import main
from harness.config import ConfigError, load
from harness.data import DataError, make_loader


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------- sweep files
@pytest.mark.parametrize("section, key", [(None, "output_dir"), ("data", "root")])
@pytest.mark.parametrize("value", ["../escape", "out/../../escape", "/tmp/x/../../etc"])
def test_parent_segments_in_output_paths_are_refused(tmp_path, tiny, monkeypatch, capsys, section, key, value):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)  # relative paths resolve here; '..' would leave it
    raw = tiny()
    (raw if section is None else raw[section])[key] = value
    path = project / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    before = tree(tmp_path)
    field = key if section is None else f"{section}.{key}"
    with pytest.raises(ConfigError, match=rf"{path}: {field}: must not contain a '\.\.' segment"):
        load(path)
    assert main(["sweep", str(path)]) == 2  # the CLI stops before Ray, data or results
    assert field in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_a_key_given_twice_is_refused_naming_key_and_line(tmp_path, tiny):
    text = yaml.safe_dump(tiny(), sort_keys=False) + "train:\n  steps: 400\n"
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"(?s){path}: malformed YAML.*duplicate key 'train'.*line \d+"):
        load(path)


@pytest.mark.parametrize("text, words", [
    ("- name: a\n- name: b\n", "<top>: expected a mapping"),
    ("name: tiny\ntrain: 5\n", "train: expected a mapping"),
    ("name: tiny\ndata: {image_size: 8.5}\n", "data.image_size: expected an integer"),
    ("name: tiny\nresources: {cpus_per_worker: 0}\n", "resources.cpus_per_worker: must be > 0"),
])
def test_wrong_shapes_name_the_field(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: {words}"):
        load(path)


# ---------------------------------------------------------------- shards
def png(width: int, height: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 9).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that *declares* width × height greyscale pixels in 60 bytes (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 9))
            + chunk(b"IEND", b""))


def shard(path: Path, key: str, image: bytes) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in [("good.cls", b"1"), ("good.png", png(8, 8)),
                           (f"{key}.cls", b"2"), (f"{key}.png", image)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def read(url: str, **kw) -> list:
    return list(make_loader([url], 1, shuffle_shards=False, image_size=8, **kw))


@pytest.mark.parametrize("key", ["../../evil", "a/../../evil", "/tmp/evil"])
def test_member_name_escaping_the_shard_is_refused(tmp_path, monkeypatch, key):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # where '../../evil.png' would land if anything extracted it
    url = shard(tmp_path / "evil.tar", key, png(8, 8))
    before = tree(tmp_path)
    with pytest.raises(DataError, match=rf"shard {url}: sample '{key}': unsafe member name"):
        read(url)
    skip = make_loader([url], 1, shuffle_shards=False, on_bad_sample="skip")
    assert len(list(skip)) == 1 and [(r.shard, r.key) for r in skip.skip_log] == [(url, key)]
    assert tree(tmp_path) == before and not Path("/tmp/evil.png").exists()


@pytest.mark.parametrize("image, words", [
    (png_header_only(100_000, 100_000), "decompression bomb"),  # PIL refuses it in Image.open
    (png_header_only(12_000, 12_000), "declares 12000x12000 pixels, expected 8x8"),  # PIL warns only
    (png(16, 16), "declares 16x16 pixels, expected 8x8"),
    (png(8, 8, "BMP"), "not a decodable image"),  # only PNG is decoded
    (png(8, 8, "GIF"), "not a decodable image"),
], ids=["bomb-1e10-px", "bomb-1.4e8-px", "wrong-size", "bmp", "gif"])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_image_payloads_raise_naming_shard_and_key(tmp_path, image, words):
    url = shard(tmp_path / "s.tar", "bad", image)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(DataError, match=rf"shard {url}: sample 'bad': .*{words}"):
        read(url)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50 * 1024  # < 50 MiB


def test_bomb_is_refused_even_without_a_declared_size(tmp_path):
    """PIL's own limit (2 x Image.MAX_IMAGE_PIXELS) when the loader is given no image_size."""
    url = shard(tmp_path / "s.tar", "bad", png_header_only(100_000, 100_000))
    with pytest.raises(DataError, match=rf"shard {url}: sample 'bad': .*decompression bomb"):
        list(make_loader([url], 1, shuffle_shards=False))


def mask_png(width: int, height: int, mode: str = "L", value: int = 3, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), value if mode != "RGB" else (value,) * 3).save(buf, format=fmt)
    return buf.getvalue()


def mask_shard(path: Path, mask: bytes | None) -> str:
    """A good 8×8 sample with its mask, then sample 'bad' whose mask is `mask` (None: absent)."""
    members = [("good.cls", b"1"), ("good.png", png(8, 8)), ("good.mask.png", mask_png(8, 8)),
               ("bad.cls", b"2"), ("bad.png", png(8, 8))] + ([("bad.mask.png", mask)] if mask else [])
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("mask, words", [
    (None, r"no \.mask\.png entry, but masks were asked for"),
    (mask_png(4, 4), r"\.mask\.png declares 4x4 pixels, expected 8x8 \(the image's\)"),
    (png_header_only(100_000, 100_000), "decompression bomb"),
    (png_header_only(12_000, 12_000), "declares 12000x12000 pixels, expected 8x8"),
    (mask_png(8, 8, value=11), r"value 11, outside 0\.\.10"),
    (mask_png(8, 8, value=255), r"value 255, outside 0\.\.10"),
    (mask_png(8, 8, mode="RGB"), "mode 'RGB', expected 'L'"),
    (mask_png(8, 8, mode="I;16"), "mode 'I;16', expected 'L'"),
    (mask_png(8, 8, fmt="GIF"), "not a decodable image"),
], ids=["missing", "wrong-size", "bomb-1e10-px", "bomb-1.4e8-px", "value-11", "value-255", "rgb",
        "16-bit", "gif"])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_masks_raise_naming_shard_and_key(tmp_path, mask, words):
    url = mask_shard(tmp_path / "m.tar", mask)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(DataError, match=rf"shard {url}: sample 'bad': .*{words}"):
        read(url, masks=True, mask_classes=11)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50 * 1024  # < 50 MiB
    skip = make_loader([url], 1, shuffle_shards=False, masks=True, mask_classes=11, on_bad_sample="skip")
    (batch,) = list(skip)
    assert batch[2].tolist() == [[[3] * 8] * 8]  # the good sample's mask
    assert [(r.shard, r.key) for r in skip.skip_log] == [(url, "bad")]


# ---------------------------------------------------------------- network exposure (slow: Ray)
CLIENT = """
import sys
from ray._raylet import GcsClient
try:
    print("NODES", len(GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)))
except Exception as e:
    print("REFUSED", type(e).__name__, e)
"""


def client(gcs: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CLIENT, gcs], env=env, capture_output=True,
                         text=True, timeout=120)
    return out.stdout.strip()


@pytest.mark.slow
def test_embedded_ray_refuses_clients_without_the_token_and_keeps_the_dashboard_local(tmp_path):
    import urllib.error
    import urllib.request

    import psutil
    import ray

    from harness.sweep import init_ray

    ray.shutdown()
    init_ray()
    try:
        gcs = ray._private.worker.global_worker.node.gcs_address
        dashboard = ray._private.worker.get_dashboard_url()
        # a stranger: no RAY_* variables and a HOME without ~/.ray/auth_token
        (tmp_path / "home").mkdir()
        bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path / "home")}
        assert client(gcs, bare).startswith("REFUSED AuthenticationError"), client(gcs, bare)
        wrong = bare | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}
        assert client(gcs, wrong).startswith("REFUSED AuthenticationError"), client(gcs, wrong)
        assert client(gcs, dict(os.environ)) == "NODES 1"  # with the token: the control
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{dashboard}/api/version", timeout=10)
        assert err.value.code == 401
        port = int(dashboard.rsplit(":", 1)[1])
        bound = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert bound == {"127.0.0.1"}, bound
        # the node's dashboard agent does listen on the node's address: it refuses a job too
        node = ray._private.worker.global_worker.node
        marker = tmp_path / "pwned"
        job = urllib.request.Request(
            f"http://{node.node_ip_address}:{node.dashboard_agent_listen_port}/api/job_agent/jobs/",
            data=f'{{"entrypoint": "touch {marker}"}}'.encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(job, timeout=10)
        assert err.value.code == 401 and not marker.exists()
    finally:
        ray.shutdown()
