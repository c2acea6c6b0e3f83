"""What a trial reads from its dataset: whole held-out splits in shard order, the training batches
across epochs, and the loader's mask arguments."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch

from .resolve import Urls
from .stream import make_loader

if TYPE_CHECKING:
    from harness.config import TrialConfig

    from .resolve import Dataset


def load_split(urls: Urls, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label of a split, in shard order (no shuffling)."""
    loader = make_loader(urls, 256, shuffle_buffer=0, drop_last=False, shuffle_shards=False,
                         image_channels=channels)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def load_masked_split(urls: Urls, mask_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image, label and class mask of a split, in shard order (no shuffling)."""
    loader = make_loader(urls, 256, shuffle_buffer=0, drop_last=False, shuffle_shards=False,
                         masks=True, mask_classes=mask_classes)
    xs, ys, ms = zip(*loader)
    return torch.cat(xs), torch.cat(ys), torch.cat(ms)


def labelled_images(urls: Urls, n: int, labelled_fraction: float = 1.0, label_seed: int = 0,
                    **noise: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` labelled images of a split in shard order (no shuffling), with their labels
    as training has them: with a labelled fraction f < 1, the images :func:`is_labelled` keeps
    labelled; with ``noise`` (``label_noise``, ``num_classes``: the positive control), the flipped
    labels. Fewer than ``n`` when the split has fewer."""
    loader = make_loader(urls, 256, shuffle_buffer=0, drop_last=False, shuffle_shards=False,
                         labelled_fraction=labelled_fraction, label_seed=label_seed, **noise)
    xs, ys, have = [], [], 0
    for x, y in loader:
        keep = y >= 0
        xs.append(x[keep])
        ys.append(y[keep])
        have += int(keep.sum())
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def forever(loader) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches across epochs; each new epoch reshuffles (the loader advances its own epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training split yields no full batch: fewer samples than one "
                               "batch per worker")


def mask_options(cfg: TrialConfig, dataset: Dataset) -> dict[str, Any]:
    """The loader's mask arguments: masks when ``segment`` is a perception task, bounded by the
    manifest's mask classes (harness.data.resolve), else by the seg head's C + 1."""
    if "segment" not in cfg.method.perception.tasks:
        return {}
    bound = dataset.mask_classes if dataset.mask_classes is not None else cfg.model_config().seg_classes
    return {"masks": True, "mask_classes": bound}


def train_loader(cfg: TrialConfig, dataset: Dataset, batch: int, rank: int, world: int):
    """This rank's training loader: its slice of the shards, shuffled by the trial's seed, with the
    trial's labelled fraction, label noise and (for a segment task) masks."""
    d = cfg.data
    return make_loader(dataset.train, batch, rank=rank, world_size=world, num_workers=d.num_workers,
                       seed=cfg.seed, shuffle_buffer=d.shuffle_buffer, on_bad_sample=d.on_bad_sample,
                       image_size=d.image_size, labelled_fraction=d.labelled_fraction,
                       label_seed=d.label_seed, **label_noise(cfg), **mask_options(cfg, dataset))


def label_noise(cfg: TrialConfig) -> dict[str, Any]:
    """The loader's label-noise arguments (``data.label_noise``: the positive control), or none."""
    d = cfg.data
    return {"label_noise": d.label_noise, "num_classes": cfg.model_config().num_classes} if d.label_noise else {}
