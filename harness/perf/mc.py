"""P3b and P3acc: what adaptive class pruning costs and what it changes, on a trained model.

P3b  zero-shot Monte Carlo classification of held-out digits (val + test): network evaluations
     per image with the shipped pruning (``McConfig.prune_k`` draws on all C classes, the other
     K − prune_k on the ``prune_keep`` best) ÷ without, at equal top-1 (within 1 point, mean over
     seeds). Beside it: wall time of both, and the teacher's fidelity (does the pruned posterior
     pick the same class as the full one, compared with two full posteriors on different draws).
P3acc the distilled head: fine-tune the trained model with a fresh head for a few steps with the
     teacher off, at the shipped defaults and at full K=8 every step; held-out head top-1.

The model is trained once (bare loop: L_ce + L_gen, AdamW) and cached under ``<out>/cache``,
keyed by everything that changes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from genrep.diffusion import make_scheduler
from genrep.metrics import top1
from genrep.model import GenRepModel, build_model
from genrep.posterior import mc_posterior, posterior
from harness.perf.common import (Row, Settings, process_group, teacher_default,
                                 teacher_full, teacher_off, trial)


def dataset(settings: Settings) -> dict[str, Any]:
    from harness.trial import prepare_data

    return prepare_data(settings.sweep)


def heldout(urls: dict[str, Any], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every val and test image (never seen in training), optionally the first ``limit``."""
    from harness.evaluate_trial import load_split

    parts = [load_split(urls[s]) for s in ("val", "test")]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return (x[:limit], y[:limit]) if limit else (x, y)


def model_key(settings: Settings, urls: dict[str, Any]) -> str:
    cfg = trial(settings, "sum", **teacher_off())
    blob = {"model": asdict(cfg.model_config()), "steps": settings.p3b_steps,
            "batch": settings.p3b_batch, "lr": cfg.train.lr, "betas": cfg.train.betas,
            "seed": cfg.seed, "p_uncond": cfg.method.p_uncond, "data": urls["key"]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trained_model(settings: Settings, urls: dict[str, Any]) -> tuple[GenRepModel, dict[str, Any]]:
    """The P3b model: from the cache, or trained now (``p3b_steps`` of L_ce + L_gen) and cached."""
    from harness.data import make_loader
    from harness.perf.steps import BareLoop
    from harness.worker import forever

    cfg = trial(settings, "sum", **teacher_off(), **{"train.batch_size": settings.p3b_batch})
    path = Path(settings.out) / "cache" / f"mc-model-{model_key(settings, urls)}.pt"
    if path.exists():
        model = build_model(cfg.model_config(), seed=cfg.seed)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), {"cached": str(path), "train_steps": settings.p3b_steps}
    loop, start = BareLoop(cfg), time.perf_counter()
    loader = make_loader(urls["train"], settings.p3b_batch, seed=cfg.seed, shuffle_buffer=256)
    batches = forever(loader)
    for step in range(settings.p3b_steps):
        loop(*next(batches), step)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(loop.model.state_dict(), tmp)
    os.replace(tmp, path)
    return loop.model.eval(), {"trained_now": str(path), "train_steps": settings.p3b_steps,
                               "train_seconds": seconds}


def classify(model: GenRepModel, x, k: int, seed: int, prune: tuple[int, int] | None, chunk: int):
    gen = torch.Generator().manual_seed(seed)
    ac = make_scheduler().alphas_cumprod
    start = time.perf_counter()
    with torch.no_grad():
        res = mc_posterior(model.eps, x, model.num_classes, k, ac, chunk_size=chunk,
                           prune_k=prune[0] if prune else None,
                           prune_keep=prune[1] if prune else None, generator=gen)
    return res, time.perf_counter() - start


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean total variation ½ Σ_c |p_c − q_c| over the images."""
    return 0.5 * (p - q).abs().sum(-1).mean().item()


def zeroed(res, tau: float = 1.0) -> torch.Tensor:
    """The posterior with every pruned class at 0, renormalised over the kept ones: what the
    teacher gave before pruned classes kept their shifted first-round estimates."""
    kept = torch.zeros_like(res.errors, dtype=torch.bool).scatter(1, res.kept, True)
    return posterior(res.errors.masked_fill(~kept, float("inf")), tau)


def mc_comparison(model, x, y, k: int, prune: tuple[int, int], seeds: int, chunk: int) -> dict[str, Any]:
    """Top-1, evaluations and seconds of the full and the pruned classifier on the same images."""
    out: dict[str, list] = {key: [] for key in ("acc_full", "acc_pruned", "t_full", "t_pruned",
                                                "agree_pruned_full", "agree_full_full", "label_kept",
                                                "qmax_full", "tv_pruned_full", "tv_full_full",
                                                "tv_zeroed_full", "qmax_full_sharp",
                                                "tv_pruned_full_sharp", "tv_full_full_sharp",
                                                "tv_zeroed_full_sharp")}
    evals, sharp = {}, 1.0 / x[0].numel()  # τ = 1/D: errors summed over the D pixels
    for s in range(seeds):
        full, t_full = classify(model, x, k, 2 * s, None, chunk)
        pruned, t_pruned = classify(model, x, k, 2 * s, prune, chunk)
        if s == 0:  # the Monte Carlo noise floor: two full estimates on different draws
            other, _ = classify(model, x, k, 1, None, chunk)
            out["agree_full_full"].append((other.pred == full.pred).float().mean().item())
            out["tv_full_full"].append(tv(other.probs, full.probs))
            out["tv_full_full_sharp"].append(tv(posterior(other.errors, sharp), posterior(full.errors, sharp)))
        evals = {"full": full.evals / len(x), "pruned": pruned.evals / len(x)}
        out["acc_full"].append(top1(full.pred, y))
        out["acc_pruned"].append(top1(pruned.pred, y))
        out["t_full"].append(t_full)
        out["t_pruned"].append(t_pruned)
        out["agree_pruned_full"].append((pruned.pred == full.pred).float().mean().item())
        out["label_kept"].append((pruned.kept == y[:, None]).any(1).float().mean().item())
        # the distillation target: how sharp q is, and how far pruning moves it (total variation):
        # the shipped estimate (pruned classes shifted), pruned classes at 0 (the estimator
        # before), and both at a sharper τ = 1/D (errors summed over the D pixels, the ELBO's scale)
        out["qmax_full"].append(full.probs.max(-1).values.mean().item())
        out["tv_pruned_full"].append(tv(pruned.probs, full.probs))
        out["tv_zeroed_full"].append(tv(zeroed(pruned), full.probs))
        out["qmax_full_sharp"].append(posterior(full.errors, sharp).max(-1).values.mean().item())
        out["tv_pruned_full_sharp"].append(tv(posterior(pruned.errors, sharp), posterior(full.errors, sharp)))
        out["tv_zeroed_full_sharp"].append(tv(zeroed(pruned, sharp), posterior(full.errors, sharp)))
    mean = {key: statistics.fmean(v) for key, v in out.items()}
    diffs = [a - b for a, b in zip(out["acc_pruned"], out["acc_full"])]
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None  # 1 seed: none
    return {**mean, "acc_diff": statistics.fmean(diffs), "acc_diff_sem": sem,
            "evals_per_image_full": evals["full"], "evals_per_image_pruned": evals["pruned"],
            "images": len(x), "seeds": seeds, "k": k, "prune_k": prune[0], "prune_keep": prune[1]}


def p3b_row(settings: Settings, model, info, x, y) -> Row:
    mc = trial(settings, **teacher_default()).method.mc
    prune = (mc.prune_k, mc.prune_keep) if mc.prune_keep is not None else (2, 3)
    k = 8
    raw = {**mc_comparison(model, x, y, k, prune, settings.p3b_seeds, mc.chunk_size), **info}
    equal = abs(raw["acc_diff"]) <= 0.01
    note = "" if settings.p3b_steps else "untrained model (--p3b-steps 0): accuracies at chance"
    return Row("P3b", f"MC zero-shot evals/image, pruned ({prune[0]} draws → keep {prune[1]}) ÷ "
                      f"full (K={k}), at equal top-1 (±1 point)",
               raw["evals_per_image_pruned"] / raw["evals_per_image_full"], "<=", 0.5, raw,
               note=note, extra_ok=equal)


def head_accuracy(model: GenRepModel, x, y) -> float:
    with torch.no_grad():
        was = model.training
        model.eval()
        acc = top1(torch.cat([model.logits(x[i:i + 256]) for i in range(0, len(x), 256)]), y)
        model.train(was)
    return acc


def finetune(settings: Settings, trained: GenRepModel, overrides: dict[str, Any], urls, x, y,
             seed: int) -> dict:
    """``acc_steps`` steps of JointStep(sum) from the trained backbone with a fresh head (ZeRO-0, so
    loading the weights after the engine is built is safe: AdamW holds the model's own tensors);
    ``seed`` draws the head's initialisation, the data order and every step's draws."""
    from harness.data import make_loader
    from harness.step import Shard, make_step
    from harness.worker import forever

    cfg = trial(settings, "sum", **overrides, **{"deepspeed.zero_stage": 0, "seed": seed})
    step_fn = make_step(cfg, Shard(0, 1, cfg.train.batch_size), torch.device("cpu"))
    model = step_fn.net.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("head."):
                p.copy_(dict(trained.named_parameters())[name])
    batches = forever(make_loader(urls["train"], cfg.train.batch_size, seed=cfg.seed, shuffle_buffer=256))
    start = time.perf_counter()
    for step in range(settings.acc_steps):
        step_fn(*next(batches), step)
    return {"head_acc": head_accuracy(model, x, y), "seconds": time.perf_counter() - start}


def p3acc_row(settings: Settings, model, x, y, urls) -> Row:
    """Mean over ``acc_seeds`` seeds of the paired difference default − full (points), with its
    standard error; the teacher-off head beside them."""
    seeds = list(range(settings.acc_seeds))
    res: dict[str, list[dict]] = {"off": [], "default": [], "full": []}
    with process_group():
        for seed in seeds:
            for name, ov in (("off", teacher_off()), ("default", teacher_default()), ("full", teacher_full())):
                res[name].append(finetune(settings, model, ov, urls, x, y, seed))
    acc = {n: [r["head_acc"] for r in rs] for n, rs in res.items()}
    diffs = [100 * (d - f) for d, f in zip(acc["default"], acc["full"])]
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    raw = {**{f"{n}_head_acc": statistics.fmean(a) for n, a in acc.items()},
           **{f"{n}_head_acc_per_seed": a for n, a in acc.items()},
           **{f"{n}_seconds": statistics.fmean(r["seconds"] for r in rs) for n, rs in res.items()},
           "diff_points_per_seed": diffs, "diff_points_sem": sem, "seeds": len(seeds),
           "steps": settings.acc_steps, "images": len(x),
           "head_acc_backbone_trained": head_accuracy(model, x, y)}
    return Row("P3acc", f"head top-1 after fine-tuning: default teacher − full K=8 teacher (points; "
                        f"fresh head on the P3b backbone, mean of {len(seeds)} seed(s))",
               statistics.fmean(diffs), ">=", -1.0, raw,
               note=f"paired over seeds, sem {sem:.2f} points; {settings.acc_steps} steps each")


def run(settings: Settings) -> list[Row]:
    urls = dataset(settings)
    model, info = trained_model(settings, urls)
    x, y = heldout(urls, settings.p3b_images)
    rows = []
    if "P3b" in settings.ids:
        rows.append(p3b_row(settings, model, info, x, y))
    if "P3acc" in settings.ids:
        rows.append(p3acc_row(settings, model, x, y, urls))
    return rows
