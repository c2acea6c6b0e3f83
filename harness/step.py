"""One training step on one data-parallel rank: losses, task gradients, the strategy, the update.

Two training modes, registered by name; the loop never names a strategy:
- ``joint``: one GenRep network; the strategy combines the perception and generation gradients of
  the shared parameters (on the *global*, all-reduced gradients), the head takes the perception
  gradient untouched. A strategy that needs no task gradients (``sum``) is a single backward.
- ``separate``: two networks of the same architecture, one per task, each with its own engine.

Randomness is drawn for the *global* batch from a generator seeded by (seed, step, stream) and each
rank takes its slice, so a W-worker run draws exactly the numbers a 1-worker run on the
concatenated batch draws: this is what makes the "2 workers = 1 worker" proof exact.
"""
from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from genrep import strategies
from genrep.diffusion import make_scheduler
from genrep.losses import cross_entropy, denoising_loss_given, distillation_loss
from genrep.model import GenRepModel, build_model
from genrep.posterior import draw_mc, mc_posterior
from genrep.registry import Registry
from harness import engine as ds
from harness.config import TrialConfig


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the global batch."""

    rank: int
    world: int
    local: int  # per-rank batch size

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rank * self.local: (self.rank + 1) * self.local]


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A generator whose state depends only on (seed, step, stream): identical on every rank."""
    digest = hashlib.sha256(f"{seed}/{step}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place average over the data-parallel ranks (a no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or ±inf: the trial stops; the message names the step and the loss."""


def check_finite(step: int, **losses: torch.Tensor) -> None:
    """Raise :class:`NonFiniteLoss` before any gradient of a non-finite loss reaches the weights.

    The verdict is global (one all-reduce of one flag per loss): a NaN on one rank's slice stops
    every rank at the same step, instead of leaving the others waiting in the next collective.
    """
    flags = torch.stack([~torch.isfinite(v.detach()).all() for v in losses.values()]).float()
    bad = [name for name, f in zip(losses, all_reduce_mean(flags).tolist()) if f > 0]
    if bad:
        here = ", ".join(f"{n} = {float(losses[n]):g}" for n in bad)
        raise NonFiniteLoss(f"step {step}: non-finite {' and '.join(bad)} (on this rank: {here}); "
                            "the trial stops before the update")


def flat(grads: list[torch.Tensor | None], params: list[nn.Parameter],
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenated gradients (into ``out`` when given); a parameter a loss does not reach gets zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)], out=out)


def unflat(vec: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        out.append(vec[i: i + p.numel()].view_as(p))
        i += p.numel()
    return out


def rss_mb() -> float:
    """Peak resident memory of this process in MiB (GPU: max_memory_allocated)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Network:
    """One GenRep network with its DeepSpeed engine and (optionally) an EMA copy."""

    def __init__(self, cfg: TrialConfig, world: int, seed: int, device: torch.device):
        self.model: GenRepModel = build_model(cfg.model_config(), seed=seed).to(device)
        self.engine = ds.make_engine(self.model, cfg, world)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.method.mc.teacher == "ema" else None
        self.decay = cfg.method.ema_decay

    @torch.no_grad()
    def update_ema(self) -> None:
        """θ_ema ← d·θ_ema + (1−d)·θ."""
        if self.ema is not None:
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1 - self.decay)

    def teacher(self) -> GenRepModel:
        return self.ema if self.ema is not None else self.model


class Step:
    """Shared machinery of both modes: draws, teacher, losses."""

    def __init__(self, cfg: TrialConfig, shard: Shard, device: torch.device):
        self.cfg, self.shard, self.device = cfg, shard, device
        self.alphas_cumprod = make_scheduler().alphas_cumprod.to(device)
        self.num_classes = cfg.model_config().num_classes

    def draws(self, step: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """(t, ε, dropout mask) for the global batch, sliced to this rank."""
        g = step_generator(self.cfg.seed, step, "denoise")
        n = self.shard.local * self.shard.world
        t = torch.randint(0, len(self.alphas_cumprod), (n,), generator=g)
        noise = torch.randn((n, *shape), generator=g)
        drop = torch.rand(n, generator=g) < self.cfg.method.p_uncond
        return tuple(self.shard.take(v).to(self.device) for v in (t, noise, drop))

    def generation_loss(self, model: GenRepModel, x, y, step: int):
        t, noise, drop = self.draws(step, tuple(x.shape[1:]))
        c = torch.where(drop, torch.full_like(y, model.null_class), y)
        return denoising_loss_given(model.eps, x, c, t, noise, self.alphas_cumprod)

    def teacher_probs(self, teacher: GenRepModel, x, step: int):
        """q(c|x) for the first ⌈subset·B⌉ images every ``mc.every`` steps, else None.

        The draws (t, ε) of every round come from the global-batch generator and each rank takes
        its rows, so a W-worker run draws what a 1-worker run draws, with or without pruning.
        Pruning applies when prune_k < k (no draws are left for a second round otherwise).
        With subset < 1 each rank scores the first images of its own slice, so W workers and
        1 worker score different images: the W = 1 equivalence holds for subset = 1.
        """
        mc, m = self.cfg.method.mc, self.cfg.method
        if m.beta_kd == 0 or step % mc.every:
            return None, {"mc_evals": 0.0}
        n = max(1, round(mc.subset * x.shape[0]))
        g = step_generator(self.cfg.seed, step, "mc")
        rows = slice(self.shard.rank * n, (self.shard.rank + 1) * n)

        def draw(k: int):
            t, eps = draw_mc(k, n * self.shard.world, tuple(x.shape[1:]), len(self.alphas_cumprod), g)
            return t[rows].to(self.device), eps[rows].to(self.device)

        prune = mc.prune_keep is not None and mc.prune_k < mc.k
        res = mc_posterior(teacher.eps, x[:n], self.num_classes, mc.k, self.alphas_cumprod,
                           tau_mc=mc.tau, chunk_size=mc.chunk_size, draw=draw,
                           prune_k=mc.prune_k if prune else None,
                           prune_keep=mc.prune_keep if prune else None)
        probs, stderr, evals = res.probs, res.stderr, res.evals
        finite = stderr[torch.isfinite(stderr)]
        return probs, {"mc_evals": float(evals),
                       "mc_stderr": float(finite.mean()) if finite.numel() else 0.0}

    def perception_loss(self, model: GenRepModel, x, y, q):
        """L_perc = [L_ce] + β·(1/B) Σ_{i scored} L_kd,i: the distillation term on the n images the
        teacher scored, averaged over the whole batch B.

        So a scored image's target weighs what its label does, whatever the share of the batch
        the teacher scores (``mc.subset``). Averaged over the n alone, each scored image weighed
        B/n times its label: at subset 1/8 the fine-tuned head lost 2.1 points against no teacher
        while the whole-batch teacher lost none (docs/performance.md, P3acc).
        """
        m, logits = self.cfg.method, model.logits(x)
        loss, metrics = logits.new_zeros(()), {}
        if m.use_ce:
            ce, mce = cross_entropy(logits, y)
            loss, metrics = loss + ce, {**metrics, **mce}
        if q is not None:
            n = q.shape[0]
            kd, mkd = distillation_loss(logits[:n], q, m.tau_kd)  # loss_kd: mean over the scored
            loss, metrics = loss + m.beta_kd * (n / x.shape[0]) * kd, {**metrics, **mkd}
        metrics["acc"] = (logits.argmax(-1) == y).float().mean()
        return loss, {**metrics, "loss_perc": loss.detach()}


MODES: Registry[type] = Registry("training mode")


@MODES.register("joint")
class JointStep(Step):
    def __init__(self, cfg: TrialConfig, shard: Shard, device: torch.device):
        super().__init__(cfg, shard, device)
        self.net = Network(cfg, shard.world, cfg.seed, device)
        self.strategy = strategies.get(cfg.strategy.name)
        model = self.net.model
        self.shared, self.head = model.shared_parameters(), model.head_parameters()
        tensor = cfg.strategy.granularity == "tensor"
        self.segments = strategies.segment_ids([p.numel() for p in self.shared]).to(device) if tensor else None
        self.state = None  # a stateful rule's running state (gradvac)
        self.buffer: torch.Tensor | None = None  # [2, D] task gradients, reused every step

    def networks(self) -> dict[str, Network]:
        return {"joint": self.net}

    def task_grads(self, g_p, g_g) -> torch.Tensor:
        """[g_p; g_g] flattened into one [2, D] buffer kept across steps.

        A fresh D-sized tensor costs as much CPU in first-touch page faults as in the copy itself
        (glibc hands large blocks back to the OS on free): with a fresh stack per step and a
        fresh combined vector, genrep cost 1.10x sum at batch 32 on digits16, with the buffer
        and the in-place combination 1.05x (docs/performance.md, P2).
        """
        if self.buffer is None:
            d = sum(p.numel() for p in self.shared)
            self.buffer = torch.empty(2, d, dtype=self.shared[0].dtype, device=self.device)
        flat(g_p, self.shared, out=self.buffer[0])
        flat(g_g, self.shared, out=self.buffer[1])
        return self.buffer

    def __call__(self, x, y, step: int) -> dict[str, Any]:
        model, engine = self.net.model, self.net.engine
        q, mq = self.teacher_probs(self.net.teacher(), x, step)
        loss_p, mp = self.perception_loss(model, x, y, q)
        loss_g, mg = self.generation_loss(model, x, y, step)
        check_finite(step, loss_perc=loss_p, loss_gen=loss_g)
        if self.strategy.needs_task_grads:
            tel = self.aligned_backward(loss_p, loss_g)
        else:
            engine.backward(loss_p + loss_g)
            tel = {}
        engine.step()
        self.net.update_ema()
        return {**mq, **mp, **mg, **tel}

    def aligned_backward(self, loss_p, loss_g) -> dict[str, float]:
        """Task gradients → global Gram matrix → strategy weights → combined gradient.

        Every rule is per-segment weights w from the Gram matrix of the *global* (averaged) task
        gradients, so each rank combines its *local* gradients with the global weights,
        c_r = w_p·g_p,r + w_g·g_g,r, and the engine's own averaging of c_r gives exactly
        w_p·ḡ_p + w_g·ḡ_g. Only the Gram matrix needs the global gradients (``global_gram``).
        """
        params, n = self.shared + self.head, len(self.shared)
        g_p = torch.autograd.grad(loss_p, params, allow_unused=True)
        g_g = torch.autograd.grad(loss_g, self.shared, allow_unused=True)
        local = self.task_grads(g_p[:n], g_g)
        gram = global_gram(local, self.segments)
        w, tel = strategies.weights(self.strategy.name, gram, state=self.state,
                                    **self.cfg.strategy.options)
        self.state = tel.pop("state", self.state)
        combined = combine_in_place(local, w, self.segments)
        head = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_p[n:], self.head)]
        ds.backward_combined(self.net.engine, params, unflat(combined, self.shared) + head)
        return telemetry(gram, tel)


def combine_in_place(local: torch.Tensor, w: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """w_p·g_p + w_g·g_g, written over local[0] for whole-vector weights (no D-sized temporary;
    see ``JointStep.task_grads``); per-tensor weights go through ``strategies.apply_weights``."""
    if segments is not None:
        return strategies.apply_weights(local, w, segments)
    w_p, w_g = w.reshape(-1, 2)[0].tolist()
    return local[0].mul_(w_p).add_(local[1], alpha=w_g)


def global_gram(local: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """Gram matrices [S, 2, 2] of the rank-averaged task gradients ḡ = (1/W) Σ_r g_r.

    Reduce-scatter gives each rank a 1/W slice of ḡ_p and ḡ_g (2·D·(W−1)/W floats sent per
    rank, half an all-reduce of the pair); the Gram matrix is a sum over coordinates, so the
    slices' partial Grams add up to the full one with an all-reduce of 4·S floats. Measured
    (perf P2dp, docs/performance.md): exactly 2·⌈D/W⌉·W + 4·S floats handed to collectives per
    step; on gloo the pair's reduce-scatter took 14.7 ms where an all-reduce of it took 9.3 ms.
    """
    num = 1 if segments is None else int(segments[-1]) + 1
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return strategies.gram_matrix(local, segments, num_segments=num)
    world, rank, d = dist.get_world_size(), dist.get_rank(), local.shape[1]
    m = -(-d // world)  # slice length; the padding is zeros and adds nothing to the Gram
    padded = torch.nn.functional.pad(local, (0, m * world - d))
    mine = torch.empty(2, m, dtype=local.dtype, device=local.device)
    for task in range(2):
        dist.reduce_scatter_tensor(mine[task], padded[task].contiguous())
    mine /= world
    seg = None
    if segments is not None:
        seg = torch.nn.functional.pad(segments, (0, m * world - d))[rank * m: (rank + 1) * m]
    gram = strategies.gram_matrix(mine, seg, num_segments=num)
    dist.all_reduce(gram)
    return gram


def telemetry(gram: torch.Tensor, tel: dict[str, torch.Tensor]) -> dict[str, float]:
    """Whole-vector cos and norms (the segments' Grams summed), strategy values averaged."""
    g = gram.sum(0)
    n_p, n_g = g[0, 0].clamp_min(0).sqrt(), g[1, 1].clamp_min(0).sqrt()
    cos = g[0, 1] / (n_p * n_g).clamp_min(1e-30)
    out = {"cos": float(cos), "norm_p": float(n_p), "norm_g": float(n_g),
           "norm_ratio": float(n_p / n_g.clamp_min(1e-30))}
    for key in ("conflict", "damping", "w_p", "w_g"):
        if key in tel and torch.is_tensor(tel[key]):
            out[key] = float(tel[key].float().mean())
    return out


@MODES.register("separate")
class SeparateStep(Step):
    """Two networks: perception-only and generation-only; the teacher is the generation network."""

    def __init__(self, cfg: TrialConfig, shard: Shard, device: torch.device):
        super().__init__(cfg, shard, device)
        self.perc = Network(cfg, shard.world, cfg.seed, device)
        self.gen = Network(cfg, shard.world, cfg.seed + 10_000, device)

    def networks(self) -> dict[str, Network]:
        return {"perception": self.perc, "generation": self.gen}

    def __call__(self, x, y, step: int) -> dict[str, Any]:
        q, mq = self.teacher_probs(self.gen.teacher(), x, step)
        loss_p, mp = self.perception_loss(self.perc.model, x, y, q)
        loss_g, mg = self.generation_loss(self.gen.model, x, y, step)
        check_finite(step, loss_perc=loss_p, loss_gen=loss_g)
        self.perc.engine.backward(loss_p)
        self.perc.engine.step()
        self.gen.engine.backward(loss_g)
        self.gen.engine.step()
        self.gen.update_ema()
        return {**mq, **mp, **mg}


def mode_for(strategy: str) -> str:
    return "separate" if strategy == "separate" else "joint"


def make_step(cfg: TrialConfig, shard: Shard, device: torch.device) -> Step:
    return MODES.get(mode_for(cfg.strategy.name))(cfg, shard, device)


def timed(fn, *args) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
