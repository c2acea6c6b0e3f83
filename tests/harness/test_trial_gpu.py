"""The GPU settings, checked on CPU: what sweeps/gpu_multinode.yaml asks of DeepSpeed (bf16/fp16,
ZeRO-2), of torch.distributed (NCCL) and of Ray (a GPU per Train worker). Nothing here needs a
device except the ``gpu``-marked test, which skips without one (scripts/gpu_check.sh runs a real
trial on the GPU path)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.config import load
from harness.engine import ds_config
from harness.trial import scaling_config, torch_config
from tests.conftest import ROOT

GPU_SWEEP = ROOT / "sweeps" / "gpu_multinode.yaml"


@pytest.fixture(scope="module")
def gpu_trials():
    return load(GPU_SWEEP).config.trials()


def with_sections(trial, **sections):
    """The trial with fields of its deepspeed/resources sections replaced."""
    return dataclasses.replace(trial, **{name: dataclasses.replace(getattr(trial, name), **fields)
                                         for name, fields in sections.items()})


def test_gpu_multinode_resolves_to_bf16_zero2_nccl_and_a_gpu_per_worker(gpu_trials):
    # 4 strategies + 2 variants, 3 seeds: every trial gets the same GPU settings
    assert len(gpu_trials) == 18
    for trial in gpu_trials:
        conf = ds_config(trial, world_size=trial.resources.workers)
        assert conf["bf16"] == {"enabled": True} and "fp16" not in conf
        assert conf["zero_optimization"] == {"stage": 2}
        # 256 images a step over 4 ranks: 64 per GPU, no accumulation
        assert (conf["train_batch_size"], conf["train_micro_batch_size_per_gpu"]) == (256, 64)
        assert conf["gradient_accumulation_steps"] == 1
        assert torch_config(trial).backend == "nccl"
        scaling = scaling_config(trial)
        assert scaling.num_workers == 4 and scaling.use_gpu
        assert scaling.resources_per_worker == {"CPU": 8.0, "GPU": 1.0}
        assert scaling.placement_strategy == "SPREAD"


def test_fp16_gets_loss_scaling_and_fp32_neither(gpu_trials):
    trial = gpu_trials[0]
    fp16 = ds_config(with_sections(trial, deepspeed={"precision": "fp16"}), world_size=4)
    # dynamic loss scaling starting at 2^12: fp16's range needs it, bf16's does not
    assert fp16["fp16"] == {"enabled": True, "initial_scale_power": 12} and "bf16" not in fp16
    fp32 = ds_config(with_sections(trial, deepspeed={"precision": "fp32"}), world_size=4)
    assert "bf16" not in fp32 and "fp16" not in fp32
    assert fp32["gradient_clipping"] == trial.train.grad_clip  # DeepSpeed's default 1.0 never used


def test_one_rank_drops_zero_but_keeps_the_precision(gpu_trials):
    conf = ds_config(gpu_trials[0], world_size=1)
    assert conf["zero_optimization"] == {"stage": 0} and conf["bf16"] == {"enabled": True}
    assert conf["train_micro_batch_size_per_gpu"] == 256


@pytest.mark.parametrize("backend, gpus, expected", [
    ("auto", 1.0, "nccl"), ("auto", 0.0, "gloo"), ("auto", 0.5, "nccl"),
    ("gloo", 1.0, "gloo"), ("nccl", 1.0, "nccl")])
def test_backend_choice(gpu_trials, backend, gpus, expected):
    trial = with_sections(gpu_trials[0], deepspeed={"backend": backend},
                          resources={"gpus_per_worker": gpus})
    assert torch_config(trial).backend == expected


def test_cpu_workers_ask_ray_for_no_gpu(gpu_trials):
    trial = with_sections(gpu_trials[0], resources={"gpus_per_worker": 0.0, "cpus_per_worker": 0.99})
    scaling = scaling_config(trial)
    assert not scaling.use_gpu and scaling.resources_per_worker == {"CPU": 0.99}


def test_zero3_is_refused(gpu_trials):
    with pytest.raises(ValueError, match="zero_stage: 3"):
        ds_config(with_sections(gpu_trials[0], deepspeed={"zero_stage": 3}), world_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_has_what_the_gpu_path_uses():
    """On a GPU machine: NCCL built in, bf16 supported, a bf16 matmul runs on the device."""
    import torch.distributed as dist

    assert dist.is_nccl_available()
    assert torch.cuda.is_bf16_supported()
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.isfinite((x @ x).float()).all()
