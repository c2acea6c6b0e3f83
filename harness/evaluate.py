"""End-of-trial scoring of the networks, the same yardstick for every strategy (DESIGN.md, "Metrics").

Perception: head top-1 and ECE, the network's own zero-shot (Monte Carlo) accuracy. Generation:
held-out denoising loss at fixed (t, ε), and class-conditional DDIM samples scored by the cached
reference classifier (``fd_ref``, ``sample_acc``). Cost: seconds and network evaluations spent.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from genrep.metrics import (expected_calibration_error, feature_stats, frechet_distance,
                            heldout_denoising_loss, top1)
from genrep.posterior import mc_posterior
from genrep.reference import ReferenceNet, accuracy, embed, train_reference
from genrep.sampling import sample_grid, sampling_evals, save_grid_png

HELDOUT_SEED = 0  # fixed noise for the held-out loss: the same draws for every trial and strategy


# ---------------------------------------------------------------- reference classifier cache

def _atomic_write(path: Path, write) -> None:
    """write(file) into a unique temp file beside ``path``, then os.replace: readers see all or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_stem(cache_dir: Path, key: str, train_kw: dict[str, Any]) -> Path:
    """``reference-<key>-<hash of train_kw>``: a change of training settings is a new entry."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)[:96]
    kw = hashlib.sha256(json.dumps(train_kw, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return cache_dir / f"reference-{safe}-{kw}"


def _load_reference(pt: Path):
    """(net, info) from one cached file holding both, or None when there is none yet."""
    if not pt.exists():
        return None
    blob = torch.load(pt, map_location="cpu", weights_only=True)
    info = blob["info"]
    net = ReferenceNet(info["channels"], info["num_classes"], info["width"])
    net.load_state_dict(blob["state_dict"])
    return net.eval(), {**info, "trained": False}


def reference_classifier(cache_dir, key: str, train_images, train_labels, val_images, val_labels,
                         **train_kw):
    """The reference classifier for ``key`` (the dataset manifest's checksum): trained once with
    ``train_reference(**train_kw)``, then loaded from ``cache_dir``. Returns (net, info) with
    info['ref_val_acc'] and info['trained'] (False when it came from the cache).

    Weights and info are one file (``.pt``) written by temp + os.replace, so two racing processes
    may both train, but a reader never sees a half-written or mismatched pair; ``.json`` is a
    readable copy of the info.
    """
    cache_dir = Path(cache_dir)
    stem = _cache_stem(cache_dir, key, train_kw)
    cached = _load_reference(stem.with_suffix(".pt"))
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    net = train_reference(train_images, train_labels, **train_kw)
    info = {"key": key, "channels": net.channels, "num_classes": net.num_classes, "width": net.width,
            "ref_val_acc": accuracy(net, val_images, val_labels),
            "ref_train_seconds": time.perf_counter() - t0, "train_kw": json.dumps(train_kw, default=str)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(stem.with_suffix(".pt"),
                  lambda f: torch.save({"state_dict": net.state_dict(), "info": info}, f))
    _atomic_write(stem.with_suffix(".json"), lambda f: f.write(json.dumps(info, indent=2).encode()))
    return net, {**info, "trained": True}


# ---------------------------------------------------------------- evaluation

@contextlib.contextmanager
def eval_mode(*modules):
    """Put modules in eval mode for the block and restore each one's previous mode after."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


def eps_fn(model):
    """ε_θ with inputs cast to the model's parameter dtype (bf16 engines) and fp32 outputs."""
    dtype = next(model.parameters()).dtype
    return lambda x, t, c: model.eps(x.to(dtype), t, c).float()


@torch.no_grad()
def head_metrics(model, images, labels, batch_size: int = 256) -> dict[str, float]:
    """Top-1 and ECE of the perception head's softmax on held-out images."""
    dtype = next(model.parameters()).dtype
    logits = torch.cat([model.logits(images[i:i + batch_size].to(dtype)).float()
                        for i in range(0, images.shape[0], batch_size)])
    return {"head_acc": top1(logits, labels),
            "head_ece": expected_calibration_error(logits.softmax(-1), labels)}


def mc_metrics(model, images, labels, k: int, alphas_cumprod, seed: int) -> tuple[dict[str, float], int]:
    """Zero-shot diffusion-classifier top-1 (Li et al. 2023) with K shared draws; B·K·C evaluations."""
    gen = torch.Generator(device=images.device).manual_seed(seed)
    res = mc_posterior(eps_fn(model), images, model.num_classes, k,
                       alphas_cumprod.to(images.device), generator=gen)
    return {"mc_acc": top1(res.pred, labels), "mc_evals_per_image": res.evals / images.shape[0]}, res.evals


def heldout_metrics(model, images, labels, alphas_cumprod) -> tuple[dict[str, float], int]:
    """Held-out ε-MSE at fixed timesteps and fixed noise (mean and per t); N·|timesteps| evaluations."""
    mean, per_t = heldout_denoising_loss(eps_fn(model), images, labels,
                                         alphas_cumprod.to(images.device), seed=HELDOUT_SEED)
    out = {"heldout_loss": mean, **{f"heldout_loss_t{t}": v for t, v in per_t.items()}}
    return out, images.shape[0] * len(per_t)


def sample_metrics(model, images, ref_net, per_class: int, steps: int, guidance_scale: float,
                   seed: int, grid_path=None) -> tuple[dict[str, float], int]:
    """Class-conditional DDIM samples scored by the reference net: Fréchet distance of its features
    to the held-out images' (fd_ref) and its accuracy on the samples (sample_acc)."""
    samples, labels = sample_grid(eps_fn(model), model.num_classes, per_class, images.shape[1:],
                                  device=images.device, steps=steps, guidance_scale=guidance_scale,
                                  null_class=model.null_class, generator=seed)
    if grid_path is not None:
        save_grid_png(samples, model.num_classes, grid_path)
    fd = frechet_distance(*feature_stats(embed(ref_net, images)), *feature_stats(embed(ref_net, samples)))
    out = {"fd_ref": fd, "sample_acc": accuracy(ref_net, samples, labels)}
    return out, sampling_evals(samples.shape[0], steps, guidance_scale)


def evaluate(perc_model, gen_model, val_images, val_labels, ref_net, *, mc_k: int = 8,
             mc_images: int = 64, sample_per_class: int = 10, ddim_steps: int = 20,
             guidance_scale: float = 1.0, seed: int = 0, alphas_cumprod,
             grid_path=None) -> dict[str, float]:
    """All held-out metrics of one trial (perc_model is gen_model for joint training).

    eval_network_evals counts per-sample network forwards: MC (B·K·C) + sampling (N·steps, ×2 with
    CFG) + held-out loss (N·4); the head's encoder-only forwards are not counted.
    """
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    with eval_mode(perc_model, gen_model, ref_net):
        out.update(head_metrics(perc_model, val_images, val_labels))
        n_mc = min(mc_images, val_images.shape[0])
        mc, mc_evals = mc_metrics(gen_model, val_images[:n_mc], val_labels[:n_mc], mc_k,
                                  alphas_cumprod, seed)
        held, held_evals = heldout_metrics(gen_model, val_images, val_labels, alphas_cumprod)
        gen, gen_evals = sample_metrics(gen_model, val_images, ref_net, sample_per_class, ddim_steps,
                                        guidance_scale, seed, grid_path)
    out.update(mc | held | gen)
    out["eval_network_evals"] = float(mc_evals + held_evals + gen_evals)
    out["eval_seconds"] = time.perf_counter() - t0
    return {k: float(v) for k, v in out.items()}


__all__ = ["reference_classifier", "evaluate"]
