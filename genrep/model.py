"""The GenRep network: one class-conditional ε-prediction diffusion backbone with a perception head.

The same weights serve both tasks (docs/method.md, "The network"):
- generation: ``eps(x_t, t, c)`` is ε_θ(x_t, t, c), with c = ``null_class`` the unconditional case
  (label dropout), which also makes classifier-free guidance possible;
- perception: ``logits(x)`` pools the backbone's own bottleneck features of the input at a fixed
  small timestep t_p with the null label, and a linear or MLP head maps them to class logits;
- dense perception (``seg_head=True``): ``seg_logits(x)`` reads the outputs of the denoiser's
  decoder blocks (same t_p, same ∅) and a small task decoder (``SegHead``) turns them into
  per-pixel logits at input resolution: class 0 is background, class c + 1 is shape class c.
  ``perceive(x)`` feeds both heads from one backbone pass;
- semantic-driven generation (``semantic=True``, issues 21, 30): ``semantic_map(x)`` is x_sem,
  the perception branch's feature map before the head's pooling, and ``eps_semantic(x_t, t, c,
  x_sem)`` adds the module's spatial correction Δε(x_t, t, x_sem) to ε (``genrep.semantic``).

Backbones are registered by name (``unet``, ``dit``); presets give the sizes for the 16×16
digits default and for 32×32 / 64×64 RGB data.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from genrep.registry import Registry
from genrep.semantic import SemanticModulation


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the network; every field is a sweep-file field under ``model:``."""

    backbone: str = "unet"
    image_size: int = 16
    channels: int = 1
    num_classes: int = 10
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention: bool = False  # attention blocks in the lowest-resolution level(s) of the UNet
    # how many of the lowest levels get them with attention on (1: the lowest only); the mid
    # block's attention is always there (diffusers' default). Measured on digits16 (docs/strategies.md)
    attention_levels: int = 1
    dit_depth: int = 4  # DiT only
    dit_heads: int = 4
    dit_head_dim: int = 16
    dit_patch: int = 2
    head: str = "linear"  # linear | mlp
    head_hidden: int = 128
    t_perception: int = 10  # t_p: the fixed small timestep at which features are read
    seg_head: bool = False  # a segmentation head on the decoder blocks' outputs (issue 22)
    seg_hidden: int = 32  # channels of the segmentation decoder
    semantic: bool = False  # the semantic modulation module (issue 21, genrep/semantic.py)
    sem_hidden: int = 64  # hidden width of f_σ and of the REPA projector
    sem_width: int = 32  # channels of the semantic mean correction's convs (x_sem projected to it)

    @property
    def seg_classes(self) -> int:
        """Per-pixel classes: background (0) and one per image class (c + 1)."""
        return self.num_classes + 1


PRESETS: dict[str, ModelConfig] = {
    # 1.1 M parameters, about 0.19 s per training step at batch 64 on 2 CPU cores (docs/performance.md).
    "digits16": ModelConfig(),
    "rgb32": ModelConfig(image_size=32, channels=3, block_out_channels=(64, 128, 128, 256),
                         layers_per_block=2, norm_num_groups=32, attention=True, head="mlp"),
    "rgb64": ModelConfig(image_size=64, channels=3, block_out_channels=(64, 128, 256, 256, 512),
                         layers_per_block=2, norm_num_groups=32, attention=True, head="mlp"),
    "dit16": ModelConfig(backbone="dit", block_out_channels=(64,)),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset's config with some fields replaced (``preset("rgb32", num_classes=100)``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class Backbone(nn.Module):
    """What the GenRep model needs from a diffusion network."""

    feature_dim: int
    dense_channels: tuple[int, ...]  # channels of each level ``features_and_dense`` returns

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feature_layer(self) -> nn.Module:
        """The module whose output ``features`` pools."""
        raise NotImplementedError

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """``feature_layer``'s output → Tensor[B, feature_dim], as ``features`` pools it."""
        raise NotImplementedError

    def as_map(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``feature_layer``'s output for input x → its map [B, feature_dim, h, w], unpooled."""
        raise NotImplementedError

    def feature_map(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The map [B, feature_dim, h, w] that ``features`` pools (x_sem, issue 30)."""
        raise NotImplementedError

    def eps_and_feature_map(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_θ(x_t, t, c), the feature map of the same pass): one forward of ``eps``, with a
        forward hook on ``feature_layer`` keeping its output (so ε is bitwise ``eps``'s)."""
        seen: list[torch.Tensor] = []
        handle = self.feature_layer().register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            eps = self.eps(x_t, t, labels)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"the feature layer ran {len(seen)} times in one forward")
        return eps, self.as_map(seen[0], x_t)

    def features_and_dense(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(``features(x, t, labels)``, the dense levels [B, C_i, h_i, w_i]) from one pass."""
        raise NotImplementedError


BACKBONES: Registry[Callable[[ModelConfig], Backbone]] = Registry("backbone")


@BACKBONES.register("unet")
class UNetBackbone(Backbone):
    """diffusers ``UNet2DModel`` with ``num_classes + 1`` class embeddings (the last is ∅)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from diffusers import UNet2DModel

        n = len(cfg.block_out_channels)
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if cfg.attention:  # level i from the bottom: down block n−1−i, up block i
            for i in range(min(cfg.attention_levels, n)):
                down[n - 1 - i], up[i] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.unet = UNet2DModel(
            sample_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=cfg.norm_num_groups, num_class_embeds=cfg.num_classes + 1)
        self.feature_dim = cfg.block_out_channels[-1]
        # up block i ends at reversed(block_out_channels)[i] channels (diffusers UNet2DModel)
        self.dense_channels = tuple(reversed(cfg.block_out_channels))

    def eps(self, x_t, t, labels):
        return self.unet(x_t, t, class_labels=labels).sample

    def _embedding(self, t, labels, dtype):
        u = self.unet
        return u.time_embedding(u.time_proj(t).to(dtype)) + u.class_embedding(labels)

    def _encode(self, x, emb):
        """conv_in, down blocks, mid block → (mid output, the skip activations the up blocks take)."""
        u = self.unet
        h = u.conv_in(x)
        skips = (h,)
        for block in u.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        return u.mid_block(h, emb), skips

    def features(self, x, t, labels):
        """Mean-pooled mid-block activations; runs only the encoder half (conv_in, down, mid)."""
        return self.pool(self.feature_map(x, t, labels))

    def feature_map(self, x, t, labels):
        """The mid block's output [B, C, h, w] (encoder half only)."""
        mid, _ = self._encode(x, self._embedding(t, labels, x.dtype))
        return mid

    def feature_layer(self):
        return self.unet.mid_block

    def pool(self, h):
        """Mean over H×W of the mid block's output [B, C, h, w]."""
        return h.mean(dim=(2, 3))

    def as_map(self, h, x):
        return h

    def features_and_dense(self, x, t, labels):
        """Pooled mid block and every up block's output, coarse to fine, from one pass.

        The up loop is UNet2DModel.forward's: each up block takes the last len(resnets) skip
        activations, newest first. The output layers (conv_norm_out, conv_out) only ε needs,
        so they do not run.
        """
        emb = self._embedding(t, labels, x.dtype)
        h, skips = self._encode(x, emb)
        pooled, levels = h.mean(dim=(2, 3)), []
        for block in self.unet.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], emb)
            skips = skips[:-n]
            levels.append(h)
        return pooled, levels


@BACKBONES.register("dit")
class DiTBackbone(Backbone):
    """diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023) with ∅ as an extra class.

    Features: the token mean after the middle transformer block. The blocks after it are skipped
    by running the model's own modules up to there. Dense levels (no decoder here): the tokens
    after the middle block and after each later one, each unpatchified to its (H/p)×(W/p) grid.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.dit = DiTTransformer2DModel(
            num_attention_heads=cfg.dit_heads, attention_head_dim=cfg.dit_head_dim,
            in_channels=cfg.channels, out_channels=cfg.channels, num_layers=cfg.dit_depth,
            sample_size=cfg.image_size, patch_size=cfg.dit_patch,
            num_embeds_ada_norm=cfg.num_classes + 1, norm_num_groups=1)
        # diffusers' DiT drops each block's label on its own (LabelEmbedding, p = 0.1 in train
        # mode, from the global RNG, to an extra row): label dropout is ours (draws.drop → ∅),
        # so it is switched off; the extra row stays, unused, so seeded inits are unchanged
        for module in self.dit.modules():
            if hasattr(module, "dropout_prob") and hasattr(module, "token_drop"):
                module.dropout_prob = 0.0
        self.channels = cfg.channels
        self.patch = cfg.dit_patch
        self.feature_dim = cfg.dit_heads * cfg.dit_head_dim
        self.middle = max(1, cfg.dit_depth // 2)  # blocks the pooled features run through
        self.dense_channels = (self.feature_dim,) * (cfg.dit_depth - self.middle + 1)

    def eps(self, x_t, t, labels):
        return self.dit(x_t, timestep=t, class_labels=labels).sample[:, : self.channels]

    def _middle(self, x, t, labels):
        """The tokens [B, N, D] after the middle block (the blocks after it do not run)."""
        d = self.dit
        h = d.pos_embed(x)
        for block in d.transformer_blocks[: self.middle]:
            h = block(h, timestep=t, class_labels=labels)
        return h

    def features(self, x, t, labels):
        return self.pool(self._middle(x, t, labels))

    def feature_map(self, x, t, labels):
        return self.as_map(self._middle(x, t, labels), x)

    def feature_layer(self):
        return self.dit.transformer_blocks[self.middle - 1]

    def pool(self, h):
        """Mean over the tokens [B, N, D] after the middle block."""
        return h.mean(dim=1)

    def as_map(self, h, x):
        """Tokens [B, N, D] → [B, D, H/p, W/p]: PatchEmbed flattens the grid row-major."""
        return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], x.shape[-2] // self.patch,
                                         x.shape[-1] // self.patch)

    def features_and_dense(self, x, t, labels):
        """Token mean after the middle block; tokens [B, N, D] of blocks middle..depth → [B, D, h, w]."""
        d, (gh, gw) = self.dit, (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        h, pooled, levels = d.pos_embed(x), None, []
        for i, block in enumerate(d.transformer_blocks, start=1):
            h = block(h, timestep=t, class_labels=labels)
            if i == self.middle:
                pooled = h.mean(dim=1)
            if i >= self.middle:  # PatchEmbed flattens the grid row-major: token = row·w + col
                levels.append(h.transpose(1, 2).reshape(h.shape[0], h.shape[2], gh, gw))
        return pooled, levels


def make_head(kind: str, dim: int, num_classes: int, hidden: int) -> nn.Module:
    """Linear probe or a one-hidden-layer MLP on the pooled features."""
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
    if kind == "mlp":
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(),
                             nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown head {kind!r}; known: linear, mlp")


class SegHead(nn.Module):
    """Task decoder on multi-scale features (an FPN-style sum; Kirillov et al. 2019, panoptic FPN):

        h = Σ_i up_{H×W}(P_i f_i),   logits = W_2 SiLU(conv3×3(SiLU(GN(h))))

    P_i a 1×1 conv per level (C_i → hidden), up bilinear to the input size (it commutes with P_i,
    so projecting first is exact and cheaper), GN one-group GroupNorm (the levels' scales differ),
    W_2 a 1×1 conv to the per-pixel classes.
    """

    def __init__(self, in_channels: tuple[int, ...], hidden: int, num_out: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in in_channels)
        self.norm = nn.GroupNorm(1, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, num_out, 1)

    def forward(self, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        h = sum(_resize(p(f), size) for p, f in zip(self.proj, levels, strict=True))
        return self.out(F.silu(self.conv(F.silu(self.norm(h)))))


def _resize(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


class GenRepModel(nn.Module):
    """Backbone (shared parameters) + perception heads (task-specific parameters)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.null_class = cfg.num_classes
        self.backbone = BACKBONES.get(cfg.backbone)(cfg)
        self.head = make_head(cfg.head, self.backbone.feature_dim, cfg.num_classes, cfg.head_hidden)
        # built after the other modules and only when on, so seeded inits without it are unchanged
        self.seg_head = (SegHead(self.backbone.dense_channels, cfg.seg_hidden, cfg.seg_classes)
                         if cfg.seg_head else None)
        # built last, for the same reason: a model without it initialises as before
        self.semantic = (SemanticModulation(cfg.channels, self.backbone.feature_dim, cfg.sem_hidden,
                                            cfg.sem_width) if cfg.semantic else None)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t, c); ``labels == null_class`` is the unconditional model."""
        return self.backbone.eps(x_t, t, labels)

    def eps_and_feature_map(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_θ(x_t, t, c) [B, C, H, W], the denoiser's feature map [B, F, h, w] at the layer
        ``backbone.features`` pools) from one forward; ε is bitwise ``eps``'s."""
        return self.backbone.eps_and_feature_map(x_t, t, labels)

    def eps_semantic(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                     x_sem: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t, c, x_sem) = ε_θ(x_t, t, c) + Δε(x_t, t, x_sem) (GenRep's mean correction in
        ε form, ``SemanticModulation.delta_eps``); x_sem [B, F, h, w] is used as given (detach it
        to stop its gradient)."""
        if self.semantic is None:
            raise ValueError("eps_semantic needs the semantic module: ModelConfig(semantic=True)")
        return self.eps(x_t, t, labels) + self.semantic.delta_eps(x_t, t, x_sem)

    def _perception_condition(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_p, ∅) for every image: perception reads the clean input, unconditionally."""
        n = x.shape[0]
        t = torch.full((n,), self.cfg.t_perception, dtype=torch.long, device=x.device)
        null = torch.full((n,), self.null_class, dtype=torch.long, device=x.device)
        return t, null

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """z = head(pool(features(x, t_p, ∅))): the clean input read at the fixed small t_p."""
        return self.head(self.semantic_features(x))

    def semantic_features(self, x: torch.Tensor) -> torch.Tensor:
        """pool(features(x, t_p, ∅)) [B, F]: exactly what the classification head reads."""
        return self.backbone.features(x, *self._perception_condition(x))

    def semantic_map(self, x: torch.Tensor) -> torch.Tensor:
        """x_sem = features(x, t_p, ∅) before pooling, [B, F, h, w]: the map whose mean over
        positions the classification head reads (the semantic module's input, issue 30)."""
        return self.backbone.feature_map(x, *self._perception_condition(x))

    def seg_logits(self, x: torch.Tensor) -> torch.Tensor:
        """S = seg_head(decoder levels(x, t_p, ∅)) ∈ R^{B×(C+1)×H×W}; class 0 is the background."""
        if self.seg_head is None:
            raise ValueError("seg_logits needs the segmentation head: ModelConfig(seg_head=True)")
        return self.perceive(x)["seg_logits"]

    def perceive(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every enabled perception output: ``logits`` [B, C], and ``seg_logits`` [B, C+1, H, W]
        when the seg head is on, both from one backbone pass (the encoder runs once)."""
        if self.seg_head is None:
            return {"logits": self.logits(x)}
        pooled, levels = self.backbone.features_and_dense(x, *self._perception_condition(x))
        return {"logits": self.head(pooled), "seg_logits": self.seg_head(levels, tuple(x.shape[-2:]))}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The backbone's, then the semantic module's when on: it takes the generation gradient,
        and the gradient-alignment strategies see it."""
        shared = [self.backbone] + ([self.semantic] if self.semantic is not None else [])
        return [p for m in shared for p in m.parameters() if p.requires_grad]

    def attention_mask(self) -> list[bool]:
        """Per tensor of ``shared_parameters()``: does it belong to a diffusers ``Attention`` module
        (q, k, v, out projections and the block's own norm)? What ``strategy.scope: attention``
        aligns (genrep/strategies/scope.py); digits16 has 10 such tensors, the UNet's mid block."""
        from diffusers.models.attention_processor import Attention

        attention = {id(p) for m in self.modules() if isinstance(m, Attention) for p in m.parameters()}
        return [id(p) in attention for p in self.shared_parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """Task-specific parameters: the classification head, then the seg head when on."""
        heads = [self.head] + ([self.seg_head] if self.seg_head is not None else [])
        return [p for h in heads for p in h.parameters() if p.requires_grad]


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_size(cfg: ModelConfig) -> tuple[int, int]:
    """(tensors, parameters) of the shared weights in diffusers ``Attention`` modules, from the
    model built on the meta device (no memory, ~40 ms for rgb32, cached): what a config check needs."""
    lists = {k: tuple(v) for k, v in vars(cfg).items() if isinstance(v, list)}  # a YAML list
    return _attention_size(replace(cfg, **lists))


@functools.lru_cache(maxsize=32)
def _attention_size(cfg: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = GenRepModel(cfg)
    inside = [p.numel() for p, a in zip(model.shared_parameters(), model.attention_mask()) if a]
    return len(inside), sum(inside)


def build_model(cfg: ModelConfig, seed: int | None = None) -> GenRepModel:
    """The model, initialised from ``seed`` when given (so every worker starts identical)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return GenRepModel(cfg)
    return GenRepModel(cfg)


__all__ = ["ModelConfig", "PRESETS", "preset", "GenRepModel", "SegHead", "build_model",
           "BACKBONES", "num_parameters", "attention_size"]
