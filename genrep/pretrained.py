"""A backbone's weights in diffusers' own format: a warm start that every arm and seed fine-tunes
from (GenRep itself starts from a pretrained diffusion model), and a user's checkpoint loaded the
same way.

Only the diffusers network (``UNet2DModel`` or ``DiTTransformer2DModel``) is saved and loaded, with
``save_pretrained`` / ``from_pretrained``: the heads, the segmentation head and the semantic
module are the arms' own and keep the initialisation of each trial's seed. A checkpoint whose
architecture differs from the model's (another config value, other class embeddings) is refused
with the keys that differ.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from genrep.model import GenRepModel

# diffusers' bookkeeping in a saved config, not the architecture
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


class ArchitectureMismatch(ValueError):
    """A checkpoint whose diffusers config differs from the model's; the message lists the keys."""


def diffusers_network(model: GenRepModel) -> nn.Module:
    """The backbone's diffusers model (a ``ModelMixin``: save_pretrained / from_pretrained)."""
    backbone = model.backbone
    return backbone.unet if hasattr(backbone, "unet") else backbone.dit


def save_backbone(model: GenRepModel, path: str | Path) -> Path:
    """``save_pretrained`` of the backbone's diffusers network into ``path`` (config.json +
    diffusion_pytorch_model.safetensors)."""
    path = Path(path)
    diffusers_network(model).save_pretrained(str(path), safe_serialization=True)
    return path


def architecture(config) -> dict:
    """A diffusers config without its bookkeeping keys: what must match to load weights."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
            if k not in _BOOKKEEPING}


def load_backbone(model: GenRepModel, path: str | Path) -> GenRepModel:
    """The backbone's weights from a ``save_pretrained`` directory, in place; the rest of the model
    (heads, semantic module) keeps its own initialisation. ArchitectureMismatch names the keys
    whose values differ (e.g. ``num_class_embeds``: another class count)."""
    net = diffusers_network(model)
    loaded = type(net).from_pretrained(str(path), low_cpu_mem_usage=False)  # no `accelerate` needed
    want, got = architecture(net.config), architecture(loaded.config)
    diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if diff:
        shown = ", ".join(f"{k}: checkpoint {got.get(k)!r}, model {want.get(k)!r}" for k in diff)
        raise ArchitectureMismatch(f"{path}: another architecture than the model's ({shown})")
    net.load_state_dict(loaded.state_dict())
    return model


def weights_digest(path: str | Path) -> str:
    """sha256 of every file of a saved checkpoint, in name order (the cache's integrity check)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()
