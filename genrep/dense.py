"""Dense perception (segmentation): its loss and its metrics. The loss returns (loss, metrics).

Per-pixel classes: K = C + 1, class 0 the background, class c + 1 image class c (the shapes
source's masks; ``ModelConfig.seg_classes``). Logits S ∈ R^{B×K×H×W}, masks m ∈ {0..K−1}^{B×H×W},
p = softmax over the K channels of S. A mask value of −1 (``IGNORE``: every pixel of an image
without a label, data.labelled_fraction < 1) is no target: the losses and ``seg_acc`` skip it.

Held-out mIoU and pixel accuracy come from one confusion matrix summed over the whole held-out
set (``confusion_matrix`` per batch, added up), not from a mean of per-image scores: an image
where a class is absent says nothing about that class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -1  # the mask value of a pixel without a target (an unlabelled image's whole mask)


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """L_ce = −(1/(B·H·W)) Σ_{b,i: m_bi ≥ 0} log p_{b, m_bi, i}: cross-entropy per pixel.

    Pixels with m = −1 add nothing and the sum is divided by all B·H·W pixels (as the image-level
    CE divides by B, genrep.losses.cross_entropy): W ranks equal 1 rank exactly, and a fully
    labelled batch gives F.cross_entropy's mean bitwise (sum/N and the mean agree on CPU).
    """
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE, reduction="sum") / masks.numel()


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L_dice = 1 − (1/|P|) Σ_{k∈P} (2 Σ_bi p_bki g_bki + ε) / (Σ_bi p_bki + Σ_bi g_bki + ε).

    Multi-class soft Dice (Milletari et al. 2016, arXiv:1606.04797, one term per class as in Sudre
    et al. 2017, arXiv:1707.03237), g the one-hot mask. Sums run over the whole batch (one Dice per
    class, not per image). The denominator is linear in p (Milletari squares it; for one-hot g that
    only changes Σp to Σp²). P = the classes present in the batch's masks (Σ g_k > 0), never empty:
    a class absent from the target would have Dice ≈ 0 for any p ≠ 0 and add a constant 1/K of
    loss with a gradient that only pushes its p to zero, which the cross-entropy already does.
    Pixels with m = −1 (``IGNORE``) are left out of every sum (p and g zeroed there); a batch
    without any target pixel gives 0, still a function of the logits.
    """
    valid = (masks >= 0).unsqueeze(1)
    p = logits.float().softmax(dim=1) * valid  # × 1 where every pixel has a target: bitwise p
    g = F.one_hot(masks.clamp_min(0), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype) * valid
    dims = (0, 2, 3)
    overlap, p_sum, g_sum = (p * g).sum(dims), p.sum(dims), g.sum(dims)
    dice = (2 * overlap + eps) / (p_sum + g_sum + eps)
    present = g_sum > 0
    if not bool(present.any()):
        return 0.0 * p_sum.sum()
    return 1 - dice[present].mean()


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, dice_weight: float = 0.0,
                      eps: float = 1e-6):
    """L_seg = L_ce + λ_dice · L_dice (``pixel_cross_entropy``, ``soft_dice_loss``).

    logits [B, K, H, W], masks Long[B, H, W] with values in [0, K), or −1 for a pixel without a
    target. Metrics: ``loss_seg_ce``, ``loss_dice`` (when λ_dice ≠ 0), ``seg_acc`` (this batch's
    pixel accuracy over the pixels with a target; absent when there are none), ``loss_seg``.
    """
    masks = masks.long()  # packed masks may arrive as uint8
    ce = pixel_cross_entropy(logits, masks)
    loss, metrics = ce, {"loss_seg_ce": ce.detach()}
    if dice_weight != 0.0:
        dice = soft_dice_loss(logits, masks, eps)
        loss, metrics = loss + dice_weight * dice, {**metrics, "loss_dice": dice.detach()}
    valid = masks >= 0
    if bool(valid.any()):
        metrics["seg_acc"] = (logits.detach().argmax(1) == masks)[valid].float().mean()
    return loss, {**metrics, "loss_seg": loss.detach()}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """M[i, j] = #{pixels with target i and prediction j} (rows: truth), Long[K, K]; any shapes alike."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    for name, v in (("pred", pred), ("target", target)):
        if v.numel() and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} has values outside [0, {num_classes}): "
                             f"min {int(v.min())}, max {int(v.max())}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU_k = M_kk / (Σ_j M_kj + Σ_i M_ik − M_kk); NaN for a class in neither target nor prediction."""
    m = confusion.double()
    tp = m.diagonal()
    union = m.sum(0) + m.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def miou(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mIoU = mean of IoU_k over the classes k in the target or the prediction, background included.

    A class in neither (union 0) is left out of the mean, never counted as 0 or 1; a class only
    predicted counts as IoU 0. Returns (mIoU, per-class IoU with NaN for the left-out classes);
    mIoU is NaN when the matrix is empty.
    """
    per_class = iou_per_class(confusion)
    seen = ~per_class.isnan()
    mean = per_class[seen].mean() if seen.any() else per_class.new_tensor(float("nan"))
    return mean, per_class


def pixel_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """acc = Σ_k M_kk / Σ_{i,j} M_ij: the share of pixels classified right (background included)."""
    m = confusion.double()
    return m.diagonal().sum() / m.sum()


def image_confusions(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """M_n for each image n, Long[N, K, K] (``confusion_matrix`` of image n alone); Σ_n M_n = M."""
    return torch.stack([confusion_matrix(p, t, num_classes) for p, t in zip(pred, target)])


def bootstrap_stderr(confusions: torch.Tensor, statistic, n_boot: int = 200, seed: int = 0) -> float:
    """SE ≈ sd over b = 1..B of statistic(Σ_{n ∈ S_b} M_n), S_b N images drawn with replacement.

    The bootstrap over images (Efron & Tibshirani 1993, ch. 6; seeded, B = 200): the image is the
    unit of replication, since pixels of one image are far from independent. ``statistic`` maps a
    summed confusion matrix to a number (``lambda m: miou(m)[0]``, ``pixel_accuracy``).
    Cost: B sums of N K×K matrices, negligible beside the forwards.
    """
    n = confusions.shape[0]
    if n_boot < 2 or n < 2:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    m = confusions.cpu()
    stats = [float(statistic(m[torch.randint(n, (n,), generator=g)].sum(0))) for _ in range(n_boot)]
    return torch.tensor(stats, dtype=torch.float64).std().item()


__all__ = ["pixel_cross_entropy", "soft_dice_loss", "segmentation_loss", "confusion_matrix",
           "iou_per_class", "miou", "pixel_accuracy", "image_confusions", "bootstrap_stderr"]
