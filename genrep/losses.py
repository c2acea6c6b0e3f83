"""Losses of the unified network. Each returns (loss, metrics) with detached metric values."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from genrep.diffusion import DenoisingDraws, condition, draw_denoising, q_sample

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def denoising_loss(
    eps_fn: EpsFn,
    x0: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    p_uncond: float,
    null_class: int,
    generator: torch.Generator | None = None,
):
    """L_gen = E_{t~U[0,T), ε} ||ε − ε_θ(x_t, t, c̃)||², mean over elements (Ho et al. 2020, eq. 14),
    with fresh draws (t, ε, c̃) from ``generator``."""
    draws = draw_denoising(x0.shape[0], tuple(x0.shape[1:]), alphas_cumprod.shape[0], p_uncond,
                           generator, x0.device)
    return generation_loss(eps_fn, x0, labels, draws, alphas_cumprod, null_class)


def generation_loss(eps_fn: EpsFn, x0, labels, draws: DenoisingDraws, alphas_cumprod, null_class: int):
    """L_gen = (1/n) Σ ||ε − ε_θ(x_t, t, c̃)||² (mean over elements) for given draws (t, ε, drop),
    c̃ = ∅ where dropped, else y (Ho et al. 2020, eq. 14; Ho & Salimans 2022): the data-parallel
    harness draws for the global batch and passes each rank its rows."""
    c_tilde = condition(labels, draws.drop, null_class)
    return denoising_loss_given(eps_fn, x0, c_tilde, draws.t, draws.noise.to(x0.dtype), alphas_cumprod)


def denoising_loss_given(eps_fn: EpsFn, x0, c_tilde, t, noise, alphas_cumprod):
    """||ε − ε_θ(x_t, t, c̃)||² (mean over elements) for given t, ε and conditioning c̃."""
    eps_pred = eps_fn(q_sample(x0, t, noise, alphas_cumprod), t, c_tilde)
    loss = F.mse_loss(eps_pred.float(), noise.float())
    return loss, {"loss_gen": loss.detach()}


UNLABELLED = -1  # the label of an image without one (data.labelled_fraction < 1; docs/data.md)


def labelled_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"acc": top-1 over the labelled rows (y ≥ 0)}; {} when no row of the batch has a label."""
    known = labels >= 0
    if not bool(known.any()):
        return {}
    return {"acc": (logits.detach().argmax(-1) == labels)[known].float().mean()}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    """L_ce = −(1/B) Σ_{b: y_b ≥ 0} Σ_c ỹ_bc log softmax(z_b)_c, ỹ = (1−ε)·onehot(y) + ε/C (ε = 0:
    plain CE; label smoothing, Szegedy et al. 2016, arXiv:1512.00567).

    A row with y = −1 (``UNLABELLED``) adds nothing, and the sum is divided by the batch size B,
    not by the labelled count: so each labelled image weighs what it would in a fully labelled
    batch, and W data-parallel ranks (each dividing by its own B/W, the engine averaging over
    ranks) give exactly 1 rank on the whole batch, however the labelled images fall on the ranks.
    A fully labelled batch takes F.cross_entropy's mean, bitwise the loss before labels could be
    missing (with ε > 0 the sum/B differs from it in the last float bit). ``acc`` is over the
    labelled rows (absent without any); ``labelled`` is the share of rows with a label.
    """
    known = labels >= 0
    if bool(known.all()):
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    else:
        loss = F.cross_entropy(logits.float(), labels, ignore_index=UNLABELLED, reduction="sum",
                               label_smoothing=label_smoothing) / labels.shape[0]
    return loss, {"loss_ce": loss.detach(), **labelled_accuracy(logits, labels),
                  "labelled": known.float().mean()}


def distillation_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, tau: float,
                      batch_size: int | None = None):
    """L_kd = τ² · (1/B) Σ_{b scored} KL(q_b ‖ softmax(z_b/τ)) (Hinton et al. 2015, arXiv:1503.02531).

    The teacher scored the first n = len(q) rows of ``logits``; B = ``batch_size`` (default n)
    divides the sum, so each scored image weighs what its label does in L_ce whatever share of
    the batch the teacher scores (averaged over the n alone, each scored image weighed B/n times
    its label: at subset 1/8 the head lost 2.1 points against no teacher; docs/performance.md).
    n = 0 (no teacher this step) gives 0, still a function of the logits. τ² keeps the gradient's
    scale independent of τ. q log q uses xlogy, so classes the teacher pruned (q = 0 exactly)
    contribute 0 instead of NaN. The logged ``loss_kd`` is the mean over the scored rows.
    """
    n = teacher_probs.shape[0]
    q = teacher_probs.detach().float()
    log_p = F.log_softmax(logits[:n].float() / tau, dim=-1)
    kl = (torch.xlogy(q, q) - q * log_p).sum(-1)
    loss = tau**2 * kl.sum() / (n if batch_size is None else batch_size)
    metrics = {}
    if n:
        metrics = {"loss_kd": (tau**2 * kl.mean()).detach(),
                   "kd_agree": (logits[:n].argmax(-1) == q.argmax(-1)).float().mean()}
    return loss, metrics


def perception_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor | None = None,
    beta: float = 0.0,
    tau: float = 1.0,
    use_ce: bool = True,
    label_smoothing: float = 0.0,
):
    """L_perc = L_ce(ε) + β·τ²·(1/B) Σ_{b scored} KL(q_b ‖ softmax(z_b/τ)) (either term may be off, not both).

    ``teacher_probs`` [n, C] holds the teacher's posterior for the first n ≤ B images (n = 0: the
    teacher did not run this step); the distillation term is averaged over the whole batch B.
    Labels of −1 (unlabelled images): L_ce skips them (still divided by B, ``cross_entropy``);
    the teacher may score them, so L_kd is how an unlabelled image reaches the head. ``acc`` is
    over the labelled rows only.
    """
    if not use_ce and beta == 0.0:
        raise ValueError("perception_loss needs use_ce=True or beta > 0")
    if beta != 0.0 and teacher_probs is None:
        raise ValueError(f"beta={beta} needs teacher_probs")
    loss, metrics = logits.new_zeros((), dtype=torch.float32), {}
    if use_ce:
        ce, m = cross_entropy(logits, labels, label_smoothing)
        loss, metrics = loss + ce, {**metrics, **m}
    if beta != 0.0:
        kd, m = distillation_loss(logits, teacher_probs, tau, batch_size=logits.shape[0])
        loss, metrics = loss + beta * kd, {**metrics, **m}
    metrics |= {**labelled_accuracy(logits, labels), "labelled": (labels >= 0).float().mean()}
    return loss, {**metrics, "loss_perc": loss.detach()}


def multitask_perception_loss(terms: dict[str, tuple[torch.Tensor, dict]], weights: dict[str, float]):
    """L_perc = Σ_k w_k·L_k over the enabled perception tasks k (docs/method.md, "Dense perception").

    ``terms``: task → (L_k, metrics), e.g. ``{"classify": perception_loss(...), "segment":
    genrep.dense.segmentation_loss(...)}``, so with both tasks L_perc = w_cls·(L_ce + β·L_kd) +
    w_seg·L_seg. Metrics: every task's own and ``loss_perc`` = the weighted sum; with several
    tasks the classification term's own ``loss_perc`` is renamed ``loss_cls``. A weight of 1 is
    exact: one classification task gives bitwise the loss, gradient and metrics of
    ``perception_loss`` alone.
    """
    if not terms:
        raise ValueError("multitask_perception_loss needs at least one task")
    loss, metrics = None, {}
    for task, (term, m) in terms.items():
        weighted = weights[task] * term
        loss = weighted if loss is None else loss + weighted
        m = dict(m)
        if "loss_perc" in m and len(terms) > 1:
            m["loss_cls"] = m.pop("loss_perc")
        metrics |= m
    return loss, {**metrics, "loss_perc": loss.detach()}
