"""Data parallelism, in one place (the role of torchtitan's ``parallelize.py``).

Every collective and every piece of data-parallel bookkeeping lives here: this rank's slice of the
global batch, per-step generators every rank reproduces, all-reduces of means and of finiteness
flags, the Gram matrix of the *global* task gradients by partial sums, writing a combined gradient
into a DeepSpeed engine (the surrogate backward), the engine's backward/step, and checkpoints.
The maths (draws, losses, strategies) is genrep's and knows nothing of ranks; the training step
(harness.step) asks this module for everything that involves more than one process. The
DeepSpeed engine API is touched only here and in harness.engine (which builds the engine).

Why W workers equal 1 worker exactly (tests/harness/test_parallel.py): randomness is drawn for
the global batch from generators seeded by (seed, step, stream) and each rank takes its rows; the
strategies' weights come from the global Gram matrix; each rank combines its *local* gradients
with those global weights, and the engine's averaging gives w_p·ḡ_p + w_g·ḡ_g.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from genrep import strategies


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the global batch."""

    rank: int
    world: int
    local: int  # per-rank batch size

    @property
    def rows(self) -> slice:
        return slice(self.rank * self.local, (self.rank + 1) * self.local)

    @property
    def global_batch(self) -> int:
        return self.local * self.world

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rows]


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A generator whose state depends only on (seed, step, stream): identical on every rank."""
    digest = hashlib.sha256(f"{seed}/{step}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def distributed() -> bool:
    """More than one data-parallel rank?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place average over the data-parallel ranks (a no-op on one process)."""
    if distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def nonfinite_anywhere(values: dict[str, torch.Tensor]) -> list[str]:
    """Names of the values that are NaN/±inf on *any* rank (one all-reduce of one flag each), so
    every rank reaches the same verdict at the same step instead of some waiting in a collective."""
    flags = torch.stack([~torch.isfinite(v.detach()).all() for v in values.values()]).float()
    return [name for name, f in zip(values, all_reduce_mean(flags).tolist()) if f > 0]


def flat(grads: list[torch.Tensor | None], params: list[nn.Parameter],
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenated gradients (into ``out`` when given); a parameter a loss does not reach gets zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)], out=out)


def unflat(vec: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Views of ``vec`` shaped like ``params`` (the inverse of :func:`flat`)."""
    out, i = [], 0
    for p in params:
        out.append(vec[i: i + p.numel()].view_as(p))
        i += p.numel()
    return out


def global_gram(local: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """Gram matrices [S, 2, 2] (float64) of the rank-averaged task gradients ḡ = (1/W) Σ_r g_r.

    Reduce-scatter gives each rank a 1/W slice of ḡ_p and ḡ_g (2·D·(W−1)/W floats sent per
    rank, half an all-reduce of the pair, in the gradients' dtype: the engine averages the
    gradient itself in it too); the Gram matrix is a sum over coordinates, so the slices' partial
    Grams (float64 whatever the gradients' dtype: genrep.strategies.gram_matrix) add up to the
    full one with an all-reduce of 4·S float64s. Measured
    (perf P2dp, docs/performance.md): exactly 2·⌈D/W⌉·W + 4·S floats handed to collectives per
    step (float32 Grams then; float64 now, 4·S·8 bytes); on gloo the pair's reduce-scatter took
    14.7 ms where an all-reduce of it took 9.3 ms.
    """
    mine, seg, num = averaged_slice(local, segments)
    return _summed(strategies.gram_matrix(mine, seg, num_segments=num))


def global_grams(local: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole-vector Gram [1, 2, 2], per-segment Grams [S, 2, 2]), float64, of the rank-averaged
    task gradients, from one reduce-scatter (as :func:`global_gram`) and two all-reduces of 4 and
    4·S float64s. The whole-vector Gram is computed exactly as ``global_gram(local, None)`` computes
    it (not as the segments' sum, which differs in the last bits), so a whole-vector rule's weights
    are bitwise those of ``gram_matrix`` on the whole vector; the per-segment Grams are the
    per-tensor telemetry, and the rule's own Grams at tensor granularity or with a scope."""
    mine, seg, num = averaged_slice(local, segments)
    return (_summed(strategies.gram_matrix(mine)),
            _summed(strategies.gram_matrix(mine, seg, num_segments=num)))


def averaged_slice(local: torch.Tensor, segments: torch.Tensor | None):
    """(this rank's 1/W slice of ḡ = (1/W)Σ_r g_r by reduce-scatter, its segment ids, S); one
    process: (local, segments, S) as they are."""
    num = 1 if segments is None else int(segments[-1]) + 1
    if not distributed():
        return local, segments, num
    world, d = dist.get_world_size(), local.shape[1]
    m = -(-d // world)  # slice length; the padding is zeros and adds nothing to the Gram
    padded = torch.nn.functional.pad(local, (0, m * world - d))
    mine = torch.empty(2, m, dtype=local.dtype, device=local.device)
    for task in range(2):
        dist.reduce_scatter_tensor(mine[task], padded[task].contiguous())
    mine /= world
    seg = None
    if segments is not None:
        r = dist.get_rank()
        # padded with the last id: its gradients are zeros, and the ids stay sorted (gram_matrix's
        # fast path)
        seg = torch.nn.functional.pad(segments, (0, m * world - d), value=num - 1)[r * m: (r + 1) * m]
    return mine, seg, num


def _summed(gram: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of each rank's partial Gram (an all-reduce in the Gram's float64; nothing
    on one process)."""
    if distributed():
        dist.all_reduce(gram)
    return gram


# ------------------------------------------------------------------ the engine's side of a step
def backward(engine, loss: torch.Tensor) -> None:
    """One backward through the engine (its hooks average the gradient over ranks)."""
    engine.backward(loss)


def backward_combined(engine, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    """Make the engine's gradient equal ``grads`` without a second backward through the network.

    Surrogate loss S(θ) = Σ_i ⟨c_i, θ_i⟩ with c_i detached has ∇_θ S = c (README, "CPU and
    GPU"; its cost: docs/performance.md, P2): its backward costs O(P), and it runs through the engine's own hooks, so ZeRO's
    reduce/partition machinery and the data-parallel averaging see it like any loss.
    """
    surrogate = sum((p * g.detach()).sum() for p, g in zip(params, grads))
    engine.backward(surrogate)


def optimizer_step(engine) -> None:
    engine.step()


# ------------------------------------------------------------------------------- checkpoints
# the copies a Network may hold beside its engine: the EMA teacher and the semantic network
# (identical on every rank: rank 0 writes them, every rank reads them)
COPIES = ("ema", "sem")


def save_checkpoint(path: Path, networks: dict[str, Any], loop_state: dict[str, Any]) -> None:
    """Every engine's DeepSpeed checkpoint (collective: each rank writes its partition), rank 0
    writes the EMA teacher and semantic copies, each rank its loop state (loader position,
    strategy state, step)."""
    for name, net in networks.items():
        net.engine.save_checkpoint(str(path / name), tag="state")
        for attr in COPIES:
            if getattr(net, attr, None) is not None and rank() == 0:
                torch.save(getattr(net, attr).state_dict(), path / f"{name}-{attr}.pt")
    torch.save(loop_state, path / f"loop-rank{rank()}.pt")


def load_checkpoint(path: Path, networks: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`save_checkpoint`: loads engines and copies, returns the loop state."""
    for name, net in networks.items():
        net.engine.load_checkpoint(str(path / name), tag="state")
        for attr in COPIES:
            if getattr(net, attr, None) is not None:
                getattr(net, attr).load_state_dict(torch.load(path / f"{name}-{attr}.pt"))
    return torch.load(path / f"loop-rank{rank()}.pt", weights_only=False)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
