"""Investigation behind docs/performance.md, P3c: which timesteps should the tied reverse chain
keep, and why does it stay below the forward estimator?

What it measured: (1) ``grid``: on P3b's trained model (harness.perf.mc, cached) and the held-out
*val* images only, one tied chain per image at η = 1 with ``fine`` steps from T−1, every state
kept, and d_j(y) = ‖ε*_j − ε_θ(x_τj, τ_j, y)‖² at each (fine·C evaluations per image). At η = 1
the tied chain's states have the forward process' joint law at its timesteps
(genrep.reverse_chain.tied_step: corr(ε*_t, ε*_s) = √(SNR_t/SNR_s)), so a chain that keeps a
subset of these timesteps is a subset of this one's states: every (start, steps, burn-in, thin)
setting is scored, without another forward, on the fine grid's states nearest its kept timesteps
(within ±5 steps at fine = 100: a guide, not the row). Printed: top-1 of each aggregate for each
setting, and of each single state. (2) ``independence``: on 150 held-out images (val + test, a
fixed random subset), 3 seeds of draws, the forward full (K = 8) against the tied chain at 10/2/1
and 20/4/2 and against the *same kept timesteps with independent noise at each* (the forward
estimator on the chain's t-grid): what the chain's own correlation between states costs.

Conclusion (2026-12-07, the P3b network of 300 steps): (1) single states carry the class best at
τ ≈ 700–800 (0.74–0.79 top-1 alone on val), worst near τ = 0 (0.16) and τ = T−1 (0.12); the
best settings of each size (4–16 states) score 0.80–0.85 with noise_lme on val (180 images, one
draw), mean_log less where τ = 0 is kept, x0_lme 0.16–0.43 (its hard max picks the chain's end);
they did not carry over to all 359 images (P3c: 0.77–0.79 at 40–80 evaluations). (2) means of 3
seeds: forward 0.822; tied noise_lme 0.780 (10/2/1) and 0.789 (20/4/2), mean_log 0.704 and 0.740;
the same timesteps with independent noise: noise_lme 0.816 and 0.818, mean_log 0.764 and 0.836
(binomial SE ≈ 0.03 on 150 images; the comparisons are paired on images and draws). The gap to
the forward estimator is the chain's correlation between kept states (≈ 0.6 between neighbours
111 steps apart at η = 1; more at η < 1, which measured worse in P3c), not its t-grid: at η ≤ 1
every chain pays it.

    .venv/bin/python scripts/investigations/p3c_tied_chain_grid.py grid [fine=100] [sweep]
    .venv/bin/python scripts/investigations/p3c_tied_chain_grid.py independence [images=150] [sweep]
"""
from __future__ import annotations

import json
import sys
import time

import torch

from genrep.diffusion import make_scheduler
from genrep.metrics import top1
from genrep.posterior import mc_posterior
from genrep.reverse_chain import (AGGREGATES, aggregate_errors, chain_errors, chain_timesteps, kept_indices,
                                  noise_of_states, state_errors)
from harness.config import load
from harness.data import load_split, resolve_dataset
from harness.perf.common import Settings
from harness.perf.mc import K, heldout, trained_model


def kept_t(steps: int, burn_in: int, thin: int, start: int | None, num_timesteps: int) -> list[int]:
    """The timesteps a (steps, burn-in, thin, start) chain keeps."""
    ts = chain_timesteps(steps, num_timesteps, start)
    return ts[kept_indices(steps, burn_in, thin)].tolist()


def settings_near_grid(grid: list[int], num_timesteps: int) -> dict[str, list[int]]:
    """Every (start, steps ≤ 24, burn-in, thin ≤ 3) setting keeping 4–16 states, as indices of the
    fine grid's nearest states (within half its spacing, so its t-set up to ±5 steps at fine = 100);
    a t-set reached by several settings is listed once, under its first (longest-start) key."""
    g, seen, out = torch.tensor(grid), set(), {}
    for start in (None, 900, 800, 700, 600, 500, 400, 300):
        for steps in range(4, 25):
            for burn_in in range(0, steps - 1):
                for thin in (1, 2, 3):
                    ts = kept_t(steps, burn_in, thin, start, num_timesteps)
                    idx = tuple(int((g - t).abs().argmin()) for t in ts)
                    if not 4 <= len(ts) <= 16 or len(set(idx)) < len(idx) or idx in seen:
                        continue
                    seen.add(idx)
                    out[f"{steps}_{burn_in}_{thin}" + ("" if start is None else f"_s{start}")] = list(idx)
    return out


def grid_search(model, data, fine: int) -> None:
    """(1): the fine tied chain on val, every setting scored on its states."""
    x, y = load_split(data.urls("val"))
    ac = make_scheduler().alphas_cumprod
    start = time.perf_counter()
    run = chain_errors(model.eps, x, model.num_classes, ac, steps=fine, burn_in=0, thin=1,
                       generator=torch.Generator().manual_seed(0), chunk_size=256)
    grid = run.t_kept.tolist()
    print(f"{len(x)} val images, {fine} states, {time.perf_counter() - start:.0f} s", flush=True)
    single = {t: top1((-run.d[:, :, j]).argmax(1), y) for j, t in enumerate(grid)}
    print("single-state top-1 by t:", json.dumps({t: round(a, 3) for t, a in single.items()}))
    rows = []
    for key, where in settings_near_grid(grid, len(ac)).items():
        idx, accs = torch.tensor(where), {}
        ts = [grid[i] for i in where]
        for a in AGGREGATES:
            log_p, _ = aggregate_errors(run.d[:, :, idx], run.t_kept[idx], ac, run.dim, a)
            accs[a] = top1(log_p.argmax(1), y)
        rows.append((len(ts), key, ts, accs))
    for n in sorted({r[0] for r in rows}):
        best = sorted((r for r in rows if r[0] == n), key=lambda r: -r[3]["noise_lme"])[:8]
        for n_, key, ts, accs in best:
            print(f"n={n_:2d} {key:16s} " + " ".join(f"{a}={v:.3f}" for a, v in accs.items()) + f"  t={ts}")


def independent_errors(model, x, t_kept, ac, g) -> torch.Tensor:
    """d at the chain's kept timesteps with a fresh ε at each: x_τ = √ᾱ x + √(1−ᾱ) z_j, z_j iid."""
    z = torch.randn((len(x), len(t_kept), *x.shape[1:]), generator=g)
    a = ac.double()[t_kept].view(1, -1, *([1] * (x.dim() - 1)))
    states = (a.sqrt() * x.double().unsqueeze(1) + (1 - a).sqrt() * z).float()
    return state_errors(model.eps, states, noise_of_states(x, states, t_kept, ac), t_kept, model.num_classes)


def independence(model, data, images: int) -> None:
    """(2): forward full, tied chain, and the tied chain's timesteps with independent noise."""
    x, y = heldout(data, None)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:images]
    x, y, ac, res = x[pick], y[pick], make_scheduler().alphas_cumprod, {}
    for seed in range(3):
        g = torch.Generator().manual_seed(2 * seed)
        full = mc_posterior(model.eps, x, model.num_classes, K, ac, chunk_size=256, generator=g)
        res.setdefault("forward", []).append(top1(full.pred, y))
        for name, (steps, burn_in, thin) in {"10_2_1": (10, 2, 1), "20_4_2": (20, 4, 2)}.items():
            g = torch.Generator().manual_seed(2 * seed)
            run = chain_errors(model.eps, x, model.num_classes, ac, steps=steps, burn_in=burn_in,
                               thin=thin, generator=g)
            indep = independent_errors(model, x, run.t_kept, ac, g)
            for kind, d in (("tied", run.d), ("indep", indep)):
                for a in ("noise_lme", "mean_log"):
                    log_p, _ = aggregate_errors(d, run.t_kept, ac, run.dim, a)
                    res.setdefault(f"{kind}_{name}_{a}", []).append(top1(log_p.argmax(1), y))
        print(seed, {k: round(sum(v) / len(v), 3) for k, v in res.items()}, flush=True)


def main(mode: str = "grid", n: int | None = None, sweep: str = "sweeps/smoke.yaml") -> None:
    torch.set_num_threads(1)
    settings = Settings(sweep=load(sweep).config, ids=("P3b", "P3c"))
    data = resolve_dataset(settings.sweep)
    model, _ = trained_model(settings, data)
    if mode == "grid":
        grid_search(model, data, n or 100)
    else:
        independence(model, data, n or 150)


if __name__ == "__main__":
    main(*(int(a) if a.isdigit() else a for a in sys.argv[1:]))
