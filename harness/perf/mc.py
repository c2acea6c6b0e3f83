"""P3b: what adaptive class pruning saves in zero-shot Monte Carlo classification, at equal top-1.
Every held-out digit (val + test) is classified with K = 8 draws on all C classes (full) and with
the shipped pruning (``prune_k`` draws on all C, the other K − prune_k on the ``prune_keep``
best), on the same draws: evaluations per image, pruned ÷ full, passing only if top-1 stays within
1 point. The model (bare loop, L_ce + L_gen) is trained once and cached under ``<out>/cache``.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from genrep.diffusion import make_scheduler
from genrep.metrics import top1
from genrep.model import GenRepModel, build_model
from genrep.posterior import mc_posterior
from harness.atomic import atomic_open
from harness.data import make_loader
from harness.evaluate_trial import load_split
from harness.perf.common import TEACHERS, Row, Settings, trial
from harness.perf.steps import BareLoop
from harness.trial import prepare_data

K = 8  # draws of the full posterior: the full teacher's K (common.TEACHERS["full"])


def heldout(urls: dict[str, Any], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every val and test image (never seen in training), optionally the first ``limit``."""
    parts = [load_split(urls[s]) for s in ("val", "test")]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return (x[:limit], y[:limit]) if limit else (x, y)


def trained_model(settings: Settings, urls: dict[str, Any]) -> tuple[GenRepModel, dict[str, Any]]:
    """The P3b model: from the cache, or trained now (``p3b_steps`` of L_ce + L_gen) and cached."""
    from harness.worker import forever

    cfg = trial(settings, "sum", **TEACHERS["off"], **{"train.batch_size": settings.p3b_batch})
    # keyed by all it depends on: the trial (model, batch, optimizer, seed), steps, packed data
    key = json.dumps([cfg.to_dict(), settings.p3b_steps, urls["key"]], sort_keys=True, default=str)
    path = Path(settings.out) / "cache" / f"mc-model-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if path.exists():
        model = build_model(cfg.model_config(), seed=cfg.seed)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), {"cached": str(path), "train_steps": settings.p3b_steps}
    loop, start = BareLoop(cfg), time.perf_counter()
    batches = forever(make_loader(urls["train"], settings.p3b_batch, seed=cfg.seed, shuffle_buffer=256))
    for step in range(settings.p3b_steps):
        loop(*next(batches), step)
    info = {"trained_now": str(path), "train_steps": settings.p3b_steps,
            "train_seconds": time.perf_counter() - start}
    with atomic_open(path, "wb") as f:
        torch.save(loop.model.state_dict(), f)
    return loop.model.eval(), info


def classify(model: GenRepModel, x, k: int, seed: int, prune: tuple[int, int] | None, chunk: int):
    """The MC posterior of every image in ``x`` (``prune``: (prune_k, prune_keep)) and its seconds."""
    gen, start = torch.Generator().manual_seed(seed), time.perf_counter()
    with torch.no_grad():
        res = mc_posterior(model.eps, x, model.num_classes, k, make_scheduler().alphas_cumprod,
                           chunk_size=chunk, prune_k=prune[0] if prune else None,
                           prune_keep=prune[1] if prune else None, generator=gen)
    return res, time.perf_counter() - start


def compare(model, x, y, prune: tuple[int, int], seeds: int, chunk: int) -> dict[str, Any]:
    """Top-1, evaluations per image and seconds of the full and the pruned classifier on the same
    images and draws, one run per seed; the paired top-1 difference and its standard error."""
    got: dict[str, list[float]] = {key: [] for key in ("acc_full", "acc_pruned", "t_full", "t_pruned")}
    evals = {}
    for s in range(seeds):
        for name, p in (("full", None), ("pruned", prune)):
            res, seconds = classify(model, x, K, 2 * s, p, chunk)
            got[f"acc_{name}"].append(top1(res.pred, y))
            got[f"t_{name}"].append(seconds)
            evals[f"evals_per_image_{name}"] = res.evals / len(x)
    diffs = [a - b for a, b in zip(got["acc_pruned"], got["acc_full"])]
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None  # 1 seed: none
    return {**{key: statistics.fmean(v) for key, v in got.items()}, **evals,
            "acc_diff": statistics.fmean(diffs), "acc_diff_sem": sem, "images": len(x),
            "seeds": seeds, "k": K, "prune_k": prune[0], "prune_keep": prune[1]}


def p3b_row(settings: Settings, model, info, x, y) -> Row:
    mc = trial(settings, **TEACHERS["kd"]).method.mc
    prune = (mc.prune_k, mc.prune_keep) if mc.prune_keep is not None else (2, 3)
    raw = {**compare(model, x, y, prune, settings.p3b_seeds, mc.chunk_size), **info}
    note = "" if settings.p3b_steps else "untrained model (--p3b-steps 0): accuracies at chance"
    return Row("P3b", f"MC zero-shot evals/image, pruned ({prune[0]} draws → keep {prune[1]}) ÷ "
                      f"full (K={K}), at equal top-1 (±1 point)",
               raw["evals_per_image_pruned"] / raw["evals_per_image_full"], "<=", 0.5, raw,
               note=note, extra_ok=abs(raw["acc_diff"]) <= 0.01)


def run(settings: Settings) -> list[Row]:
    urls = prepare_data(settings.sweep)
    model, info = trained_model(settings, urls)
    x, y = heldout(urls, settings.p3b_images)
    return [p3b_row(settings, model, info, x, y)]
