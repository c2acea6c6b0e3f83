"""Dense perception through the harness (issue 22): config refusals, the step with the seg head,
held-out mIoU on packed shapes masks."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from harness.config import ConfigError, from_dict, trial_from_dict
from harness.data import (ensure_packed, load_manifest, load_masked_split, make_loader, mask_options,
                          resolve_dataset, shard_urls)
from harness.evaluate import seg_metrics
from harness.step import Shard, make_step
from tests.conftest import tiny_sweep

DENSE = {"perception": {"tasks": ["classify", "segment"]}}


def dense_sweep(tmp_path, **sections):
    """tiny_sweep on 8x8 RGB shapes with masks and both perception tasks."""
    raw = tiny_sweep(tmp_path, data={"source": "shapes", "count": 120, "masks": True},
                     method=DENSE | {"beta_kd": 0.0})
    raw["model"]["overrides"]["channels"] = 3
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.mark.parametrize("data, method, overrides, field, words", [
    ({}, DENSE, {}, "method.perception.tasks", "segment needs data.masks: true"),
    ({"masks": True}, {}, {}, "data.masks", "'digits' packs no masks"),
    ({"shapes_per_image": 2}, {}, {}, "data.shapes_per_image", "only the shapes source"),
    ({}, {}, {"seg_head": True}, "model.overrides.seg_head", "set by method.perception.tasks"),
    ({}, {"perception": {"tasks": ["classify"], "weights": {"segment": -1.0}}}, {},
     "method.perception.weights.segment", "must be >= 0"),
    ({}, {"perception": {"tasks": ["classify", "detect"]}}, {}, "method.perception.tasks[1]",
     "must be one of"),
])
def test_dense_config_refusals_name_file_and_field(tmp_path, data, method, overrides, field, words):
    raw = tiny_sweep(tmp_path, data=data, method=method)
    raw["model"]["overrides"].update(overrides)
    with pytest.raises(ConfigError, match=f"bad.yaml: {re.escape(field)}: .*{re.escape(words)}"):
        from_dict(raw, "bad.yaml")


def test_segment_only_needs_no_teacher(tmp_path):
    raw = dense_sweep(tmp_path, method={"beta_kd": 1.0, "perception": {"tasks": ["segment"]}})
    with pytest.raises(ConfigError, match="method.beta_kd: .*no classify"):
        from_dict(raw, "bad.yaml")


def test_segment_sets_the_seg_head_and_data_is_one_per_sweep(tmp_path):
    cfg = from_dict(dense_sweep(tmp_path, data={"shapes_per_image": [1, 2]}))
    trial = cfg.trial("genrep", 0)
    assert trial.model_config().seg_head and trial.data.shapes_per_image == (1, 2)
    assert trial_from_dict(trial.to_dict()) == trial
    assert not from_dict(tiny_sweep(tmp_path)).trial("sum", 0).model_config().seg_head
    raw = dense_sweep(tmp_path, variants={"cls_only": {"strategy": "sum", "overrides": {
        "method.perception.tasks": ["classify"]}}})
    assert not from_dict(raw).arm("cls_only", 0).model_config().seg_head  # a per-arm choice
    raw = dense_sweep(tmp_path, variants={"nomask": {"strategy": "sum", "overrides": {"data.masks": False}}})
    with pytest.raises(ConfigError, match="one dataset per sweep"):
        from_dict(raw)


# ---------------------------------------------------------------- the step, in process
@pytest.fixture(scope="module")
def group(gloo_group):
    """The one-rank gloo group of tests/conftest.py."""


@pytest.fixture(scope="module")
def dense(tmp_path_factory, group):
    """Both tasks with w_cls = 0: the classification head then gets no gradient at all, so any
    change to it would be the seg loss leaking into it."""
    tmp = tmp_path_factory.mktemp("dense")
    cfg = from_dict(dense_sweep(tmp, method={"perception": {
        "tasks": ["classify", "segment"], "weights": {"classify": 0.0, "segment": 1.0}}}))
    urls = resolve_dataset(cfg)
    assert urls.mask_classes == 11
    return cfg, urls


def one_step(cfg, urls, strategy):
    trial = cfg.trial(strategy, 0)
    step_fn = make_step(trial, Shard(0, 1, trial.train.batch_size), torch.device("cpu"))
    loader = make_loader(urls.train, trial.train.batch_size, image_size=8, **mask_options(trial, urls))
    x, y, masks = next(iter(loader))
    assert masks.shape == (x.shape[0], 8, 8) and masks.dtype == torch.int64
    net = next(iter(step_fn.networks().values())).model
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    metrics = step_fn(x, y, 0, masks)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    return step_fn, metrics, changed, (x, y)


@pytest.mark.parametrize("strategy", ["genrep", "sum", "separate"])
def test_step_with_the_seg_head_trains_it_and_not_the_classifier(dense, strategy):
    cfg, urls = dense
    step_fn, metrics, changed, (x, y) = one_step(*dense, strategy)
    assert {"loss_seg", "seg_acc", "loss_cls", "loss_perc"} <= set(metrics)
    assert float(metrics["loss_perc"]) == pytest.approx(float(metrics["loss_seg"]))  # w_cls = 0
    assert any(n.startswith("seg_head.") for n in changed)
    assert any(n.startswith("backbone.") for n in changed)  # the shared features see L_seg
    assert not any(n.startswith("head.") for n in changed)  # no seg gradient in the classifier
    if strategy == "genrep":  # the aligned path takes the seg head as a head (task parameters)
        model = step_fn.net.model
        assert {id(p) for p in model.seg_head.parameters()} <= {id(p) for p in step_fn.head}
        assert "cos" in metrics
    with pytest.raises(ValueError, match="needs the batch's masks"):
        step_fn(x, y, 1)  # the old three-argument call, with a segment task


# ---------------------------------------------------------------- held-out mIoU
class Oracle(torch.nn.Module):
    """A seg 'model' that predicts given masks (the truth, or all background)."""

    def __init__(self, masks, classes=11):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.cfg, self.masks = SimpleNamespace(seg_classes=classes), masks

    def seg_logits(self, images):
        return F.one_hot(self.masks[: images.shape[0]], self.cfg.seg_classes).permute(0, 3, 1, 2).float()


def test_miou_on_packed_shapes_masks(tmp_path):
    manifest = load_manifest(ensure_packed("shapes", tmp_path, count=60, image_size=32, shard_size=30,
                                           split=(0.5, 0.25, 0.25), seed=0,
                                           source_options={"shapes_per_image": [1, 2]}))
    x, y, m = load_masked_split(shard_urls(manifest, "val"), manifest.require_mask().num_classes)
    assert x.shape[0] == m.shape[0] == manifest.splits["val"].count
    perfect = seg_metrics(Oracle(m), x, m)
    assert perfect == {"miou": 1.0, "miou_stderr": 0.0, "pixel_acc": 1.0, "pixel_acc_stderr": 0.0}
    background = seg_metrics(Oracle(torch.zeros_like(m)), x, m)
    bg_share = float((m == 0).float().mean())
    present = len(torch.unique(m))  # every present class is in the truth: IoU 0 but counted
    assert background["pixel_acc"] == pytest.approx(bg_share)
    assert background["miou"] == pytest.approx(bg_share / present)
    assert 0 < background["miou_stderr"] < 0.1


def test_seg_metrics_of_a_real_seg_head_are_fractions(tmp_path):
    from genrep.model import ModelConfig, build_model

    model = build_model(ModelConfig(image_size=8, channels=3, block_out_channels=(8, 16),
                                    norm_num_groups=4, seg_head=True, seg_hidden=8), seed=0).eval()
    x, m = torch.rand(6, 3, 8, 8) * 2 - 1, torch.randint(0, 11, (6, 8, 8))
    out = seg_metrics(model, x, m)
    assert 0 <= out["miou"] <= 1 and 0 <= out["pixel_acc"] <= 1 and out["miou_stderr"] >= 0
