"""The joint step, in process (real DeepSpeed engines on a one-rank gloo group): per-tensor
conflict telemetry on every arm that takes task gradients, the whole-vector rule's weights
bitwise as from the whole-vector Gram, the balanced sum, and the arms' parameter counts."""
from __future__ import annotations

import pytest
import torch

from genrep import strategies
from genrep.strategies.telemetry import REACH, update_change
from harness import parallel
from harness.config import from_dict
from harness.evaluate_trial import cost_counts
from harness.step import Shard, make_step
from tests.conftest import tiny_sweep

BATCH = 8
SEG_KEYS = {"seg_cos_p10", "seg_cos_median", "seg_cos_p90", "seg_conflict", "seg_shared",
            "seg_norm_ratio_median"}


@pytest.fixture(scope="module")
def group(gloo_group):
    """The one-rank gloo group of tests/conftest.py."""


def step_of(tmp_path, strategy: str, granularity: str = "vector", options=None):
    raw = tiny_sweep(tmp_path, strategies=[strategy], granularity=granularity,
                     strategy_options={strategy: options or {}}, method={"beta_kd": 0.0})
    cfg = from_dict(raw).trials()[0]
    return make_step(cfg, Shard(0, 1, BATCH), torch.device("cpu"))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 1, 8, 8, generator=g).clamp(-1, 1), torch.randint(0, 10, (BATCH,), generator=g)


def whole_vector_reference(step_fn, x, y):
    """The task gradients of the step's own losses (same draws: step 0) and their whole-vector
    Gram computed as the harness did before per-tensor telemetry: gram_matrix(local, None)."""
    model = step_fn.net.model
    loss_p, _ = step_fn.perception_loss(model, x, y, x.new_zeros(0, 10))
    loss_g, _ = step_fn.generation_loss(model, x, y, 0)
    g_p = torch.autograd.grad(loss_p, step_fn.shared, allow_unused=True)
    g_g = torch.autograd.grad(loss_g, step_fn.shared, allow_unused=True)
    local = torch.stack([parallel.flat(g_p, step_fn.shared), parallel.flat(g_g, step_fn.shared)])
    return local, strategies.gram_matrix(local)


@pytest.mark.parametrize("strategy", ["pcgrad", "genrep", "sum_balanced"])
def test_vector_arm_logs_per_tensor_telemetry_and_keeps_its_whole_vector_weights(group, tmp_path, strategy):
    step_fn = step_of(tmp_path, strategy)
    x, y = batch()
    local, gram = whole_vector_reference(step_fn, x, y)
    w_ref, _ = strategies.weights(strategy, gram)
    out = step_fn(x, y, 0)
    assert SEG_KEYS <= set(out)
    # the strategy saw the whole-vector Gram, computed as before: bitwise the same weights
    assert out["w_p"] == float(w_ref[0, 0]) and out["w_g"] == float(w_ref[0, 1])
    # the per-tensor Grams with the weights broadcast give the whole vector's update change
    task_weights = step_fn.strategy.loss_weights()
    assert out["update_change"] == pytest.approx(float(update_change(gram, w_ref, task_weights)), rel=1e-5)
    assert out["cos"] == pytest.approx(float(strategies.registry.gram_stats(gram[0]).cos), abs=1e-5)
    # per tensor: the ratio's median over the tensors both tasks reach, by hand
    seg = strategies.segment_ids([p.numel() for p in step_fn.shared])
    per = strategies.gram_matrix(local, seg)
    n_p, n_g = per[:, 0, 0].sqrt(), per[:, 1, 1].sqrt()
    both = (n_p > REACH * n_p.norm()) & (n_g > REACH * n_g.norm())  # not the key bias's round-off
    assert int(((n_p > 0) & (n_g > 0)).sum()) == int(both.sum()) + 1
    assert out["seg_shared"] == pytest.approx(float(both.double().mean()))
    assert out["seg_norm_ratio_median"] == pytest.approx(float(torch.quantile((n_p / n_g)[both].double(), 0.5)), rel=1e-5)
    if strategy == "sum_balanced":  # w = ḡ/‖g‖ for each task
        mean = (out["norm_p"] + out["norm_g"]) / 2
        assert out["w_p"] == pytest.approx(mean / out["norm_p"], rel=1e-5)
        assert out["w_g"] == pytest.approx(mean / out["norm_g"], rel=1e-5)


def test_global_grams_whole_is_bitwise_the_whole_vector_gram():
    g = torch.Generator().manual_seed(3)
    local = torch.randn(2, 1000, generator=g)
    seg = strategies.segment_ids([100, 300, 600])
    whole, per = parallel.global_grams(local, seg)
    assert torch.equal(whole, parallel.global_gram(local, None))
    assert torch.equal(per, parallel.global_gram(local, seg))
    assert torch.allclose(per.sum(0), whole[0], rtol=1e-5)


def test_tensor_arm_is_unchanged_and_logs_the_same_keys(group, tmp_path):
    step_fn = step_of(tmp_path, "pcgrad", "tensor")
    x, y = batch(1)
    local, _ = whole_vector_reference(step_fn, x, y)
    per = strategies.gram_matrix(local, step_fn.segments)
    w_ref, _ = strategies.weights("pcgrad", per)
    out = step_fn(x, y, 0)
    assert SEG_KEYS <= set(out)
    assert out["w_p"] == float(w_ref[:, 0].float().mean())


def test_separate_counts_two_networks_of_the_joint_size(group, tmp_path):
    joint = cost_counts(step_of(tmp_path, "sum"))
    assert joint["num_networks"] == 1.0
    assert cost_counts(step_of(tmp_path, "genrep")) == joint  # every joint arm: the same network
    separate = cost_counts(step_of(tmp_path, "separate"))
    assert separate == {"params_total": 2 * joint["params_total"], "num_networks": 2.0}


@pytest.mark.parametrize("strategy", ["genrep", "sum", "gradvac"])
def test_strategy_options_are_resolved_once_when_the_step_is_built(group, tmp_path, monkeypatch, strategy):
    """The step checks its strategy's options (defaults filled in) when it is built, never again
    per step; the resolved options are what the rule then runs with."""
    raw = tiny_sweep(tmp_path, strategies=[strategy], strategy_options={strategy: {"task_weights": [0.7, 0.3]}},
                     method={"beta_kd": 0.0})
    cfg, calls = from_dict(raw).trials()[0], []  # the sweep's validation checks them once, too
    rule = strategies.get(strategy)
    checked = rule.check_options
    monkeypatch.setattr(rule, "check_options", lambda options: calls.append(options) or checked(options))
    step_fn = make_step(cfg, Shard(0, 1, BATCH), torch.device("cpu"))
    assert len(calls) == 1 and step_fn.task_weights == (0.7, 0.3)
    for s in range(3):
        step_fn(*batch(s), s)
    assert len(calls) == 1
