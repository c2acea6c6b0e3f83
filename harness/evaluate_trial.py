"""End-of-trial evaluation inside the Ray Train worker: the same yardstick for every strategy.

Rank 0 loads the held-out split (small; ``eval.split`` reports, val is where anything is chosen)
and scores the networks with :func:`harness.evaluate.evaluate`;
the reference classifier is trained once per dataset and cached beside the shards. The other ranks
wait at a barrier: only rank 0's report reaches Ray Tune.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from genrep.metrics import binomial_stderr
from harness.config import TrialConfig
from harness.data import Dataset, load_masked_split, load_split, mask_options


def evaluate_trial(step_fn, cfg: TrialConfig, dataset: Dataset, shard, device,
                   step: int | None = None, trial_dir: str | None = None) -> dict[str, float]:
    """Held-out metrics; the sample grid goes to ``trial_dir/samples.png`` at the end of the trial
    and to ``samples-step000100.png`` and so on for the evaluations during training (``step``)."""
    from harness.evaluate import evaluate, reference_classifier

    out: dict[str, float] = {}
    if shard.rank == 0:
        e, dense = cfg.eval, mask_options(cfg, dataset)
        val_m = None
        if dense:
            val_x, val_y, val_m = load_masked_split(dataset.urls(e.split), dense["mask_classes"])
            val_m = val_m.to(device)
        else:
            val_x, val_y = load_split(dataset.urls(e.split))
        train_x, train_y = load_split(dataset.train)
        # the val split: the reference classifier's own accuracy (ref_val_acc, whichever split
        # reports: the cache keeps the first value) and the images a guidance "auto" is chosen on
        choose_x, choose_y = (val_x, val_y) if e.split == "val" else load_split(dataset.val)
        ref, info = reference_classifier(Path(dataset.cache) / "reference", dataset.key,
                                         train_x, train_y, choose_x, choose_y, seed=0)
        nets = step_fn.networks()
        perc = nets.get("joint", nets.get("perception")).model
        gen = nets.get("joint", nets.get("generation")).model
        name = "samples.png" if step is None else f"samples-step{step:06d}.png"
        grid = Path(trial_dir) / name if trial_dir else None
        out = evaluate(perc, gen, val_x.to(device), val_y.to(device), ref, mc_k=e.mc_k,
                       mc_images=e.mc_images, sample_per_class=e.samples_per_class,
                       ddim_steps=e.ddim_steps, guidance_scale=e.guidance_scale, seed=0,
                       alphas_cumprod=step_fn.alphas_cumprod, grid_path=grid,
                       estimate=step_fn.teacher.eval_estimate(e.mc_k, step), val_masks=val_m,
                       semantic=step_fn.semantic_eval(step), guidance_choices=e.guidance_choices,
                       guidance_by=e.guidance_by, guidance_per_class=e.guidance_samples_per_class,
                       choice_images=choose_x.to(device), samplers=e.samplers, ddpm_steps=e.ddpm_steps,
                       scope="all" if step is None else e.every_metrics, robust_t=e.robust_t)
        acc, n = float(info["ref_val_acc"]), int(info.get("ref_val_n", len(choose_y)))  # older caches: no n
        out |= {"ref_val_acc": acc, "ref_val_acc_stderr": binomial_stderr(acc, n)}
        out.update(cost_counts(step_fn))
    if dist.is_initialized():
        dist.barrier()
    return out


def cost_counts(step_fn) -> dict[str, float]:
    """Parameter counts of every network trained in the trial (two for `separate`)."""
    nets = step_fn.networks()
    total = sum(sum(p.numel() for p in n.model.parameters()) for n in nets.values())
    return {"params_total": float(total), "num_networks": float(len(nets))}
