"""End-of-trial scoring of the networks, the same yardstick for every strategy (docs/evaluation.md).

Perception: head top-1 and ECE, head top-1 on inputs noised by q(x_t|x) at ``eval.robust_t``
(robustness, ``head_acc_t<t>``), the network's own zero-shot (Monte Carlo) accuracy, and with the
segmentation head mIoU and pixel accuracy over the held-out masks. Generation:
held-out denoising loss at fixed (t, ε), and class-conditional DDIM samples scored by the cached
reference classifier (``fd_ref``, ``kid_ref``, ``sample_acc``), at a fixed guidance scale or one
chosen on the val split (``choose_guidance``). Cost: seconds and network evaluations spent.
Each metric with a standard error reports it as ``<metric>_stderr`` (the results table's
``stderr`` column): binomial for the accuracies (``head_acc_t<t>`` too), over images for the
held-out loss, bootstrap for ``fd_ref``, jackknife for ``kid_ref``, and over images for ``miou``
and ``pixel_acc``; ``head_ece`` has none.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from genrep.diffusion import q_sample
from genrep.dense import bootstrap_stderr, image_confusions, miou, pixel_accuracy
from genrep.metrics import (HELDOUT_TIMESTEPS, binomial_stderr, expected_calibration_error,
                            feature_stats, frechet_distance, frechet_distance_stderr,
                            kernel_distance, kernel_distance_stderr, heldout_denoising_errors, heldout_loss_of, mean_stderr, top1)
from genrep.posterior import mc_posterior, teacher_quality
from genrep.reference import ReferenceNet, accuracy, embed, train_reference
from genrep.sampling import SAMPLER_ETA, grid_png, sample_grid, sampling_evals
from genrep.semantic import semantic_eps_fn, semantic_step_fn
from harness import atomic

HELDOUT_SEED = 0  # fixed noise for the held-out loss: the same draws for every trial and strategy
# the guidance choice's samples: draws of their own, never the reported samples' (``seed``, 0)
GUIDANCE_SEED = 1
# the robustness test's one ε (robust_metrics): the same noise for every trial, strategy and t
ROBUST_SEED = 2


# ---------------------------------------------------------------- reference classifier cache

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
    info['ref_val_acc'] (on info['ref_val_n'] images) and info['trained'] (False when it came
    from the cache).

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
            "ref_val_acc": accuracy(net, val_images, val_labels), "ref_val_n": int(val_labels.shape[0]),
            "ref_train_seconds": time.perf_counter() - t0, "train_kw": json.dumps(train_kw, default=str)}
    with atomic.atomic_open(stem.with_suffix(".pt"), "wb") as f:
        torch.save({"state_dict": net.state_dict(), "info": info}, f)
    atomic.write_text(stem.with_suffix(".json"), json.dumps(info, indent=2))
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
    """Top-1 (binomial stderr over the N images) and ECE of the perception head's softmax."""
    dtype = next(model.parameters()).dtype
    logits = torch.cat([model.logits(images[i:i + batch_size].to(dtype)).float()
                        for i in range(0, images.shape[0], batch_size)])
    acc = top1(logits, labels)
    return {"head_acc": acc, "head_acc_stderr": binomial_stderr(acc, labels.shape[0]),
            "head_ece": expected_calibration_error(logits.softmax(-1), labels)}


@torch.no_grad()
def robust_metrics(model, images, labels, alphas_cumprod, timesteps, batch_size: int = 256,
                   seed: int = ROBUST_SEED) -> dict[str, float]:
    """head_acc_t<t> = top-1 of the head on x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε, one seeded ε for all t."""
    # model.logits reads its input's features at its own fixed t_p with ∅: x_t is that input, the
    # head is not told t. One ε, drawn on the CPU (the same on every device), for every t: the
    # columns differ only in σ = √(1−ᾱ_t), logged as noise_sigma_t<t> for the report's labels.
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
    out = {}
    for t in timesteps:
        tt = torch.full((images.shape[0],), int(t), dtype=torch.long, device=images.device)
        noised = head_metrics(model, q_sample(images.float(), tt, eps.float(), alphas_cumprod), labels,
                              batch_size)
        acc = noised["head_acc"]
        out |= {f"head_acc_t{t}": acc, f"head_acc_t{t}_stderr": noised["head_acc_stderr"],
                f"noise_sigma_t{t}": float((1 - alphas_cumprod[int(t)].double()).sqrt())}
    return out


@torch.no_grad()
def seg_metrics(model, images, masks, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Held-out mIoU (background included; a class in neither truth nor prediction left out) and
    pixel accuracy of the seg head, from one confusion matrix summed over all N images
    (genrep.dense), each with a seeded bootstrap stderr over images (B = 200 resamples of the N
    per-image matrices: K² numbers each, no extra forward)."""
    dtype, k = next(model.parameters()).dtype, model.cfg.seg_classes
    conf = torch.cat([image_confusions(model.seg_logits(images[i:i + batch_size].to(dtype)).argmax(1),
                                       masks[i:i + batch_size], k)
                      for i in range(0, images.shape[0], batch_size)])
    total = conf.sum(0)
    return {"miou": float(miou(total)[0]),
            "miou_stderr": bootstrap_stderr(conf, lambda m: miou(m)[0], seed=seed),
            "pixel_acc": float(pixel_accuracy(total)),
            "pixel_acc_stderr": bootstrap_stderr(conf, pixel_accuracy, seed=seed)}


def mc_metrics(model, images, labels, k: int, alphas_cumprod, seed: int,
               estimate=None) -> tuple[dict[str, float], int]:
    """Zero-shot diffusion-classifier top-1 (Li et al. 2023) with K shared draws, binomial stderr
    over the images, and the quality of its posterior as a teacher (NLL, ECE, mean max
    probability, entropy; top-1 is mc_acc). ``estimate(eps_fn, images, generator) -> (McResult,
    τ)``: the training teacher's estimator and τ (harness.teacher.Teacher.eval_estimate); default the
    forward estimator at τ = 1 with B·K·C evaluations."""
    gen = torch.Generator(device=images.device).manual_seed(seed)
    tau = None
    if estimate is None:
        res = mc_posterior(eps_fn(model), images, model.num_classes, k,
                           alphas_cumprod.to(images.device), generator=gen)
    else:
        res, tau = estimate(eps_fn(model), images, gen)
    acc = top1(res.pred, labels)
    q = teacher_quality(res.probs, labels)
    out = {"mc_acc": acc, "mc_acc_stderr": binomial_stderr(acc, images.shape[0]),
           "mc_evals_per_image": res.evals / images.shape[0],
           "teacher_nll": q["nll"], "teacher_ece": q["ece"], "teacher_max_prob": q["mean_max_prob"],
           "teacher_entropy": q["mean_entropy"]}
    if tau is not None:
        out["teacher_tau"] = float(tau)
    return out, res.evals


def heldout_metrics(model, images, labels, alphas_cumprod, semantic=None) -> tuple[dict[str, float], int]:
    """Held-out ε-MSE at fixed timesteps and fixed noise (mean and per t), each with the stderr
    of its mean over the N images; N·|timesteps| evaluations. With ``semantic`` (semantic network,
    x_sem source) the ε is the modulated one, x_sem read as the sampler reads it
    (genrep.semantic.semantic_eps_fn: of x̂_0 or of x_t; N·|timesteps| encoder-half forwards
    more, not counted, like the head's)."""
    ac = alphas_cumprod.to(images.device)
    fn = eps_fn(model) if semantic is None else semantic_eps_fn(model, *semantic, ac)
    errors = heldout_denoising_errors(fn, images, labels, ac, seed=HELDOUT_SEED)
    mean, per_t = heldout_loss_of(errors, HELDOUT_TIMESTEPS)
    # an image's loss is its mean over the timesteps: their mean over images is ``mean``
    out = {"heldout_loss": mean, "heldout_loss_stderr": mean_stderr(errors.mean(0))}
    for (t, loss_t), e in zip(per_t.items(), errors):
        out |= {f"heldout_loss_t{t}": loss_t, f"heldout_loss_t{t}_stderr": mean_stderr(e)}
    return out, errors.numel()


def sample_metrics(model, images, ref_net, per_class: int, steps: int, guidance_scale: float,
                   seed: int, grid_path=None, semantic=None,
                   eta: float = 0.0) -> tuple[dict[str, float], int]:
    """Class-conditional DDIM samples (η = ``eta``) scored by the reference net: Fréchet distance of
    its features to the held-out images' (fd_ref, bootstrap stderr over both sets), their kernel
    distance (kid_ref, unbiased MMD², jackknife stderr) and the reference net's accuracy on the
    samples (sample_acc, binomial stderr over the samples). ``semantic``: genrep.semantic.
    semantic_step_fn's callable, for semantic-driven sampling (its semantic network's forwards are
    not counted)."""
    samples, labels = sample_grid(eps_fn(model), model.num_classes, per_class, images.shape[1:],
                                  device=images.device, steps=steps, guidance_scale=guidance_scale,
                                  null_class=model.null_class, generator=seed, semantic=semantic, eta=eta)
    if grid_path is not None:
        atomic.write_bytes(grid_path, grid_png(samples, model.num_classes))
    real, fake = embed(ref_net, images), embed(ref_net, samples)
    acc = accuracy(ref_net, samples, labels)
    out = {"fd_ref": frechet_distance(*feature_stats(real), *feature_stats(fake)),
           "fd_ref_stderr": frechet_distance_stderr(real, fake, seed=seed),
           "kid_ref": kernel_distance(real, fake), "kid_ref_stderr": kernel_distance_stderr(real, fake),
           "sample_acc": acc, "sample_acc_stderr": binomial_stderr(acc, samples.shape[0])}
    return out, sampling_evals(samples.shape[0], steps, guidance_scale)


def sampler_metric(key: str, sampler: str) -> str:
    """The name ``key`` (``fd_ref``, ``fd_ref_stderr``, ...) takes for ``sampler``: the ddim
    sampler's keep theirs, the others get its name before any ``_stderr`` (``fd_ref_ddpm``)."""
    if sampler == "ddim":
        return key
    base, tail = (key[:-len("_stderr")], "_stderr") if key.endswith("_stderr") else (key, "")
    return f"{base}_{sampler}{tail}"


def sampled(model, images, ref_net, per_class: int, samplers, steps: dict[str, int], guidance_scale,
            seed: int, grid_path=None, semantic=None) -> tuple[dict[str, float], int]:
    """``sample_metrics`` for each named sampler (genrep.sampling.SAMPLER_ETA: ddim η = 0, ddpm
    η = 1) at its ``steps``, from the same x_T (``seed``), named by ``sampler_metric``; the grid of
    a sampler other than ddim goes beside ``grid_path`` as ``<stem>-<sampler>.png``."""
    out, evals = {}, 0
    for name in samplers:
        grid = grid_path if grid_path is None or name == "ddim" else \
            Path(grid_path).with_name(f"{Path(grid_path).stem}-{name}{Path(grid_path).suffix}")
        got, n = sample_metrics(model, images, ref_net, per_class, steps[name], guidance_scale, seed,
                                grid, semantic, eta=SAMPLER_ETA[name])
        out |= {sampler_metric(k, name): v for k, v in got.items()}
        evals += n
    return out, evals


def choose_guidance(model, images, ref_net, choices, per_class: int, steps: int,
                    by: str = "fd_ref", seed: int = GUIDANCE_SEED,
                    **sample_kw) -> tuple[float, dict[float, float], int]:
    """s* = argmin_{s ∈ choices} ``by``(samples at scale s, ``images``): fd_ref or kid_ref, lower
    is better, ties to the first listed. ``images`` are the choosing split's (val), the samples
    are drawn from ``seed``, apart from the reported ones. Returns (s*, {s: value}, evaluations):
    Σ_s C·per_class·steps·(2 if s ≠ 1) forwards. ``sample_kw`` goes to :func:`sample_metrics`."""
    scores, evals = {}, 0
    for s in choices:
        out, n = sample_metrics(model, images, ref_net, per_class, steps, float(s), seed, **sample_kw)
        scores[float(s)], evals = out[by], evals + n
    return min(scores, key=scores.get), scores, evals


def evaluate(perc_model, gen_model, val_images, val_labels, ref_net, *, mc_k: int = 8,
             mc_images: int | str = 64, sample_per_class: int = 10, ddim_steps: int = 20,
             guidance_scale: float | str = 1.0, seed: int = 0, alphas_cumprod,
             grid_path=None, estimate=None, val_masks=None, semantic=None,
             guidance_choices=(1.0, 2.0, 3.0), guidance_by: str = "fd_ref",
             guidance_per_class: int | None = None, choice_images=None,
             scope: str = "all", samplers=("ddim",), ddpm_steps: int = 200,
             robust_t=()) -> dict[str, float]:
    """All held-out metrics of one trial (perc_model is gen_model for joint training);
    ``scope="perception"``: only the heads' metrics and the held-out loss (an evaluation during
    training with ``eval.every_metrics: perception``);
    ``val_masks`` [N, H, W]: also the seg head's mIoU and pixel accuracy (``seg_metrics``);
    ``robust_t``: also the head's top-1 on inputs noised to each t (``robust_metrics``), in every
    scope, since it scores the head;
    ``semantic`` (semantic network, x_sem source): the held-out loss and the samples of
    semantic-driven generation (harness.step.JointStep.semantic_eval).
    ``samplers``: "ddim" (η = 0, ``ddim_steps``: fd_ref, kid_ref, sample_acc) and/or "ddpm"
    (η = 1, ``ddpm_steps``: fd_ref_ddpm, ...), see :func:`sampled`; "auto" guidance is chosen with
    the first.
    ``mc_images``: a count, or "all" of the held-out images. ``guidance_scale: "auto"``: chosen
    among ``guidance_choices`` by ``guidance_by`` on ``choice_images`` (the val split; never the
    reported one) with ``guidance_per_class`` samples a class (default ``sample_per_class``), see
    :func:`choose_guidance`; the scale used is reported as ``guidance_scale``.

    eval_network_evals counts per-sample network forwards: MC (B·K·C) + sampling (N·steps, ×2 with
    CFG, per sampler) + the guidance choice's sampling + held-out loss (N·4); the head's (robustness:
    N·|robust_t| more) and the semantic network's encoder-only forwards are not counted.
    """
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    with eval_mode(perc_model, gen_model, ref_net):
        out.update(head_metrics(perc_model, val_images, val_labels))
        out.update(robust_metrics(perc_model, val_images, val_labels, alphas_cumprod.to(val_images.device),
                                  robust_t))
        if val_masks is not None:
            out.update(seg_metrics(perc_model, val_images, val_masks, seed=seed))
        sem_step = None
        if semantic is not None:
            sem_step = semantic_step_fn(gen_model, *semantic, alphas_cumprod.to(val_images.device))
        held, held_evals = heldout_metrics(gen_model, val_images, val_labels, alphas_cumprod, semantic)
        out.update(held)
        evals = held_evals
        if scope == "all":  # "perception": an evaluation during training stops here
            n_mc = val_images.shape[0] if mc_images == "all" else min(mc_images, val_images.shape[0])
            # the zero-shot classifier keeps the base ε, as the training teacher does: Δε(x_t, x_sem)
            # does not depend on the class, so it carries no class evidence; the posterior compares
            # the classes' ε_θ(x_t, t, c) (and x_sem would be read off the image being classified)
            mc, mc_evals = mc_metrics(gen_model, val_images[:n_mc], val_labels[:n_mc], mc_k,
                                      alphas_cumprod, seed, estimate)
            choice_evals, steps = 0, {"ddim": ddim_steps, "ddpm": ddpm_steps}
            if guidance_scale == "auto":
                if choice_images is None:
                    raise ValueError('guidance_scale "auto" needs choice_images (the val split)')
                guidance_scale, _, choice_evals = choose_guidance(
                    gen_model, choice_images, ref_net, guidance_choices,
                    guidance_per_class or sample_per_class, steps[samplers[0]], guidance_by,
                    semantic=sem_step, eta=SAMPLER_ETA[samplers[0]])
            gen, gen_evals = sampled(gen_model, val_images, ref_net, sample_per_class, samplers, steps,
                                     guidance_scale, seed, grid_path, sem_step)
            out.update(mc | gen)
            out["guidance_scale"] = guidance_scale
            evals += mc_evals + choice_evals + gen_evals
    out["eval_network_evals"] = float(evals)
    out["eval_seconds"] = time.perf_counter() - t0
    return {k: float(v) for k, v in out.items()}


__all__ = ["reference_classifier", "evaluate", "choose_guidance"]
