"""The reference classifier: a small CNN trained once on the real training images, the fixed
yardstick for generated samples (docs/evaluation.md, "The reference classifier").

No Inception weights can be downloaded here, so the Fréchet distance is computed in this net's
penultimate (128-d) feature space (``fd_ref``), and its accuracy on class-c samples says whether
they look like class c (``sample_acc``). Being independent of every trained model, it scores
all strategies alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3×3 conv → BatchNorm → ReLU (stride 2 halves the resolution)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ReferenceNet(nn.Module):
    """conv(32) → conv(64, /2) → conv(128, /2) → global average pool (features, 128-d) → linear."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.channels, self.num_classes, self.width = channels, num_classes, width
        self.body = nn.Sequential(conv_block(channels, width, 1), conv_block(width, 2 * width, 2),
                                  conv_block(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the pooled last conv block, [N, 4·width]."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Light augmentation: the batch translated by one random (dy, dx) ∈ [−s, s]², border replicated."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    s = max_shift
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., s + dy:s + dy + h, s + dx:s + dx + w]


def train_epoch(net, opt, sched, images, labels, batch_size, generator, augment) -> None:
    """One pass over a seeded permutation of the training set (cross-entropy, Adam)."""
    perm = torch.randperm(images.shape[0], generator=generator)
    for i in range(0, len(perm), batch_size):
        idx = perm[i:i + batch_size]
        x = random_shift(images[idx], generator) if augment else images[idx]
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def train_reference(images: torch.Tensor, labels: torch.Tensor, epochs: int = 15, seed: int = 0,
                    batch_size: int = 64, lr: float = 3e-3, augment: bool = True,
                    num_classes: int | None = None) -> ReferenceNet:
    """A ReferenceNet fitted to (images in [-1, 1], labels) by Adam with a one-cycle learning rate;
    deterministic for a seed (weights and batch order from seeded generators). Returned in eval mode."""
    images, labels = images.float().cpu(), labels.long().cpu()
    num_classes = num_classes or int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReferenceNet(images.shape[1], num_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * -(-images.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    net.train()
    for _ in range(epochs):
        train_epoch(net, opt, sched, images, labels, batch_size, gen, augment)
    return net.eval()


def _batched(fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def predict(net: ReferenceNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """argmax_c of the net's logits, on the net's device, in eval mode."""
    device = next(net.parameters()).device
    return _batched(lambda x: net.eval()(x.to(device).float()).argmax(-1), images, batch_size).cpu()


@torch.no_grad()
def embed(net: ReferenceNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features [N, D] (CPU float32) of images in [-1, 1]."""
    device = next(net.parameters()).device
    return _batched(lambda x: net.eval().features(x.to(device).float()), images, batch_size).cpu()


def accuracy(net: ReferenceNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """(1/N) Σ_i [argmax_c net(x_i) = y_i]."""
    return (predict(net, images, batch_size) == labels.cpu()).float().mean().item()


__all__ = ["ReferenceNet", "train_reference", "accuracy", "predict", "embed"]
