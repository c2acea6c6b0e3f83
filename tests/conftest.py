"""Shared test settings: small thread counts (2-core machine), a private cache, tiny configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.ports import free_port  # noqa: F401 (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")

TINY_MODEL = {"image_size": 8, "block_out_channels": [8, 16], "norm_num_groups": 4,
              "head_hidden": 16}


def tiny_sweep(tmp_path: Path, data_root: Path | None = None, **sections) -> dict:
    """A minimal sweep dict on 8x8 digits with a tiny UNet; sections override top-level keys.

    ``data_root``: where shards and the reference classifier are cached (default: in tmp_path).
    """
    raw = {
        "name": "tiny", "output_dir": str(tmp_path / "out"),
        "strategies": ["sum", "genrep"], "seeds": [0],
        "data": {"source": "digits", "image_size": 8, "shard_size": 300,
                 "root": str(data_root or tmp_path / "data")},
        "model": {"preset": "digits16", "overrides": dict(TINY_MODEL)},
        "method": {"beta_kd": 1.0, "mc": {"k": 2, "every": 1, "subset": 1.0}},
        "train": {"steps": 4, "batch_size": 8, "log_every": 2},
        "eval": {"mc_k": 2, "mc_images": 8, "samples_per_class": 1, "ddim_steps": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.99, "max_concurrent": 2,
                      "max_failures": 0},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """One cache of packed tiny shards and their reference classifier for the whole session:
    both are keyed by their parameters (harness.data.ensure_packed, harness.evaluate), so
    sharing them changes no result and saves each end-to-end test the packing and the
    reference classifier's training. Tests that damage shards pack their own."""
    return tmp_path_factory.mktemp("tiny-data")


@pytest.fixture
def tiny(tmp_path, tiny_data_root):
    return lambda **sections: tiny_sweep(tmp_path, tiny_data_root, **sections)


@pytest.fixture(scope="module")
def gloo_group():
    """A one-rank gloo process group for in-process DeepSpeed engines (Ray Train makes it in a
    trial); the environment DeepSpeed reads is restored afterwards."""
    import torch.distributed as dist

    from harness.engine import destroy_process_group, prepare_environment

    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    prepare_environment()
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    destroy_process_group()  # and DeepSpeed's /dev/shm workspace with it
    os.environ.clear()
    os.environ.update(saved)
