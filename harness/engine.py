"""DeepSpeed's engine: its config, its creation, its process group's end (its use in a step:
harness.parallel).

The same code runs on a laptop (CPU accelerator, gloo, fp32) and on GPUs (NCCL, bf16); only the
sweep's ``deepspeed`` and ``resources`` sections differ. Traps handled here (README, "CPU and GPU"):
- DeepSpeed's default ``gradient_clipping`` is 1.0: it is always written explicitly;
- the CPU accelerator JIT-compiles a small op on first use: it gets a private, per-user
  ``TORCH_EXTENSIONS_DIR`` and the venv's ``bin/`` (ninja) on PATH;
- ``torch.autograd.grad`` through the engine's own forward fails, so the model is always called
  as ``engine.module``; the engine is used for ``backward`` and ``step`` only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness.config import TrialConfig

log = logging.getLogger(__name__)


def prepare_environment() -> None:
    """Process-wide settings DeepSpeed needs before it is imported (idempotent)."""
    cache = Path(os.environ.get("GENREP_CACHE", Path.home() / ".cache" / "genrep-bench"))
    # one build per virtual environment: the op's build key includes the venv's include paths,
    # so two venvs sharing a directory rebuilt it (~60 CPU-seconds) every time the other had run
    venv = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions" / venv))
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(
        logging.INFO if os.environ.get("GENREP_VERBOSE") else logging.WARNING)


def zero_stage(cfg: TrialConfig, world_size: int) -> int:
    """The ZeRO stage the engine runs: the configured one, or 0 on a single data-parallel rank.

    One rank has nothing to partition: stages 1 and 2 then hold the same optimizer state as
    stage 0 and only add their flat-buffer copies of every gradient and parameter, 6.6% of a
    digits16 step here (docs/performance.md, P1). ``deepspeed.zero_on_one_rank`` keeps the stage.
    """
    if world_size == 1 and not cfg.deepspeed.zero_on_one_rank:
        return 0
    return cfg.deepspeed.zero_stage


def ds_config(cfg: TrialConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for one engine of this trial."""
    if cfg.deepspeed.zero_stage == 3:
        raise ValueError(
            "deepspeed.zero_stage: 3 is not supported: ZeRO-3 partitions the parameters outside "
            "the engine's forward, and the per-task gradients are taken through engine.module; "
            "use stage 0, 1 or 2")
    micro = cfg.train.batch_size // world_size
    conf: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": zero_stage(cfg, world_size)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif cfg.deepspeed.precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return conf


def make_optimizer(params, cfg: TrialConfig) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def lr_lambda(warmup_steps: int):
    """Linear warm-up to the base LR over ``warmup_steps``, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def make_engine(model: nn.Module, cfg: TrialConfig, world_size: int):
    """A DeepSpeed engine around ``model`` (the process group is already up: Ray Train made it)."""
    prepare_environment()
    import deepspeed

    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config(cfg, world_size), dist_init_required=False)
    return engine


def destroy_process_group() -> None:
    """End the default process group through DeepSpeed's comm module when it knows the group, so
    the group references DeepSpeed cached go with it: a later engine in the same process would
    otherwise reach for the destroyed group ("Group ... is not registered"); then remove this
    rank's DeepSpeed shared-memory workspace (``shm_workspace``)."""
    import deepspeed.comm as ds_comm

    rank = dist.get_rank() if dist.is_initialized() else None
    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()
    if rank is not None:
        shm_workspace(rank).unlink(missing_ok=True)


def shm_workspace(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce maps for ``rank`` when every rank of the group
    is on one machine (``LOCAL_SIZE`` = world size, as ``harness.perf`` sets it): 67 MB that
    DeepSpeed never unlinks (its ``shared_close`` is never called), so each group would leave one
    behind in RAM-backed /dev/shm for good. Named as ``ops/csrc/cpu/comm/shm.cpp`` names it:
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state held by this rank (ZeRO partitions it)."""
    opt = getattr(engine, "optimizer", None)
    inner = getattr(opt, "optimizer", opt)
    total = 0
    for state in getattr(inner, "state", {}).values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total
