"""Investigation behind docs/strategies.md, "Scope": how much of digits16 `strategy.scope:
attention` covers, and how far each rule moves the update there (issue 30, part 3).

What it measured, per model (digits16 as shipped: diffusers' default mid-block attention only;
and with ``model.overrides.attention: true``: attention blocks at the lowest level too): the
tensors and parameters in scope (``GenRepModel.attention_mask``); then, on a network trained
``steps`` steps by the weighted sum 0.7·L_ce + 0.3·L_gen (AdamW, lr 2e-3, batch 32, all 1,797
digits), the task gradients of ``batches`` fresh batches and, for each rule × granularity × scope,
the update change ‖u − u_ref‖/‖u_ref‖ against the weighted sum (telemetry.update_change; median
over batches), the same within the scope alone, and the scope's cos(g_p, g_g); also with
``attention_levels`` 2 and 3. Then the harness's step time for each model (``harness_steps``).

Conclusion (300 steps, 16 batches, 2026-12-07, on a loaded machine: ratios ±10%): digits16's mid
block is 10 of 153 shared tensors (1.6% of the parameters); the published rule per tensor moves
the update 8.5% on every tensor but 1.35% on the attention tensors only (8.3% inside them);
``attention: true`` covers 40 tensors (6.0%, 1.70%), ``attention_levels: 2`` 70 (10.1%, 2.57%),
``attention_levels: 3`` 100 (11.1%, 4.20%) at 1.30x and 2.51x the sum step: the attention tensors
are aligned as hard as the rest but carry little of the update. Aligning only the generation
gradient moves it 0.00-0.11% there (docs/strategies.md, "Scope").

    .venv/bin/python scripts/investigations/scope_coverage.py [steps=300] [batches=16] [model label words...]
"""
from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

from genrep import strategies as S
from genrep.diffusion import draw_denoising, make_scheduler
from genrep.losses import cross_entropy, generation_loss
from genrep.model import build_model, preset
from genrep.strategies.telemetry import scope_summary, update_change

TW = (0.7, 0.3)
RULES = {"genrep": ("genrep", {"task_weights": TW}),
         "genrep_gen": ("genrep", {"task_weights": TW, "align": "generation"}),
         "genrep_perc": ("genrep", {"task_weights": TW, "align": "perception"}),
         "pcgrad": ("pcgrad", {"task_weights": TW})}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits, 0..16 → [−1, 1], bilinear to 16×16 (as harness.data packs them)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1
    return F.interpolate(x, size=16, mode="bilinear", align_corners=False), torch.tensor(d.target)


def losses(model, x, y, step, ac):
    draws = draw_denoising(x.shape[0], tuple(x.shape[1:]), len(ac), 0.1,
                           torch.Generator().manual_seed(10_000 + step))
    loss_g, _ = generation_loss(model.eps, x, y, draws, ac, model.null_class)
    loss_p, _ = cross_entropy(model.logits(x), y)
    return loss_p, loss_g


def train(cfg, steps, data, ac):
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        i = torch.randint(0, len(data[0]), (32,), generator=g)
        loss_p, loss_g = losses(model, data[0][i], data[1][i], step, ac)
        opt.zero_grad(set_to_none=True)
        (TW[0] * loss_p + TW[1] * loss_g).backward()
        opt.step()
    return model


def task_grads(model, x, y, step, ac):
    shared = model.shared_parameters()
    loss_p, loss_g = losses(model, x, y, step, ac)
    g_p = torch.autograd.grad(loss_p, shared, allow_unused=True)
    g_g = torch.autograd.grad(loss_g, shared, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)  # noqa: E731
                                 for g, p in zip(gs, shared)])
    return torch.stack([flat(g_p), flat(g_g)])


def weights(name, opts, per, granularity, scope):
    rule = S.get(name)
    opts = rule.check_options(opts)
    if scope is not None:
        return S.scope.scoped_weights(rule, per, S.Scope.of(scope, granularity), None, opts)[0]
    gram = per if granularity == "tensor" else per.sum(0, keepdim=True)
    return rule.resolved_weights(gram, None, opts)[0].reshape(-1, 2).expand(per.shape[0], 2)


def measure(label, cfg, steps, batches, data, ac):
    model = train(cfg, steps, data, ac)
    mask = torch.tensor(model.attention_mask())
    sizes = [p.numel() for p in model.shared_parameters()]
    seg = S.segment_ids(sizes)
    in_params = sum(n for n, a in zip(sizes, mask.tolist()) if a)
    print(f"\n== {label}: {int(mask.sum())} of {len(sizes)} shared tensors in scope, "
          f"{in_params:,} of {sum(sizes):,} parameters ({in_params / sum(sizes):.2%})")
    g = torch.Generator().manual_seed(1)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for b in range(batches):
        i = torch.randint(0, len(data[0]), (32,), generator=g)
        per = S.gram_matrix(task_grads(model, data[0][i], data[1][i], 10**6 + b, ac), seg)
        for rule, (name, opts) in RULES.items():
            for gran in ("vector", "tensor"):
                for scope in ("all", "attention"):
                    w = weights(name, opts, per, gran, mask if scope == "attention" else None)
                    s = scope_summary(per, w, mask, TW)
                    rows.setdefault(f"{rule:12s} {gran:6s} {scope:9s}", []).append(
                        (float(update_change(per, w, TW)), s["scope_update_change"], s["scope_cos"]))
    print(f"{'rule granularity scope':30s} update_change  within-scope  scope cos (medians over {batches} batches)")
    for key, vals in rows.items():
        med = [statistics.median(v[j] for v in vals) for j in range(3)]
        print(f"{key:30s} {med[0]:12.4f} {med[1]:13.4f} {med[2]:10.3f}")
    return model


MODELS = {"mid block only (digits16)": {},
          "attention: true (lowest level)": {"attention": True},
          "attention_levels: 2": {"attention": True, "attention_levels": 2},
          "attention_levels: 3 (every level)": {"attention": True, "attention_levels": 3}}


def harness_steps(repeats: int = 7, block: int = 2) -> None:
    """The harness's own step (JointStep with its DeepSpeed engine, ZeRO-1 on one rank, batch 32,
    no teacher, 1 thread), as perf P1/P2 time it: `sum` and `genrep` per tensor with scope
    attention for every model above, interleaved rounds (harness.perf.common.time_interleaved),
    median s/step; synthetic images (a step's cost does not depend on pixel values)."""
    from statistics import median

    from harness.config import from_dict
    from harness.perf.common import Timed, process_group, synthetic_batch, time_interleaved
    from harness.step import Shard, make_step

    timed = {}
    with process_group():
        for label, over in MODELS.items():
            raw = {"name": "scope", "strategies": ["sum", "genrep"], "model": {"overrides": over},
                   "method": {"beta_kd": 0.0}, "train": {"batch_size": 32},
                   "strategy_options": {s: {"task_weights": list(TW)} for s in ("sum", "genrep")},
                   "granularity": "tensor", "scope": "attention"}
            for trial in from_dict(raw).trials():
                step = make_step(trial, Shard(0, 1, 32), torch.device("cpu"))
                timed[(label, trial.strategy.name)] = Timed(step, *synthetic_batch(trial), block=block)
        time_interleaved(timed, repeats, warmup=1)
    base = median(timed[(next(iter(MODELS)), "sum")].wall)
    print(f"\n== harness step, batch 32, 1 thread, median of {repeats} interleaved rounds of {block} steps")
    print(f"{'model':36s} {'sum ms':>8s} {'genrep ms':>10s} {'genrep/sum':>11s} {'sum / mid-only sum':>19s}")
    for label in MODELS:
        s, g = (median(timed[(label, k)].wall) for k in ("sum", "genrep"))
        print(f"{label:36s} {s * 1e3:8.1f} {g * 1e3:10.1f} {g / s:11.3f} {s / base:19.3f}")


def main(steps: int = 300, batches: int = 16, *which: str) -> None:
    torch.set_num_threads(1)
    data, ac = digits(), make_scheduler().alphas_cumprod
    for label, over in MODELS.items():
        if not which or any(w in label for w in which):
            measure(label, preset("digits16", **over), steps, batches, data, ac)
    harness_steps()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), *sys.argv[3:])
