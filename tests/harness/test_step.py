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
    assert out["w_p"] == float(w_ref[:, 0].mean())  # float64 Grams, float64 telemetry


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


def test_global_grams_of_bf16_gradients_are_float64():
    g = torch.Generator().manual_seed(4)
    local = torch.randn(2, 1000, generator=g).to(torch.bfloat16)
    seg = strategies.segment_ids([100, 300, 600])
    whole, per = parallel.global_grams(local, seg)
    exact = local.double() @ local.double().T
    assert whole.dtype == per.dtype == torch.float64
    assert torch.allclose(whole[0], exact, rtol=1e-13) and torch.allclose(per.sum(0), exact, rtol=1e-13)


@pytest.mark.parametrize("granularity", ["vector", "tensor"])
def test_scope_attention_aligns_only_the_attention_tensors_and_sums_the_rest(group, tmp_path, monkeypatch,
                                                                            granularity):
    """strategy.scope: attention on the published rule: the update the engine receives is genrep's
    on the attention tensors (together at vector granularity, each alone at tensor) and exactly
    0.7·g_p + 0.3·g_g on every other shared tensor."""
    raw = tiny_sweep(tmp_path, strategies=["genrep"], granularity=granularity, scope="attention",
                     method={"beta_kd": 0.0})
    step_fn = make_step(from_dict(raw).trials()[0], Shard(0, 1, BATCH), torch.device("cpu"))
    x, y = batch(2)
    local, _ = whole_vector_reference(step_fn, x, y)
    seen, original = {}, parallel.backward_combined
    monkeypatch.setattr(parallel, "backward_combined",
                        lambda engine, params, grads: seen.update(grads=[g.clone() for g in grads])
                        or original(engine, params, grads))
    out = step_fn(x, y, 0)
    n = len(step_fn.shared)
    u = torch.cat([g.reshape(-1) for g in seen["grads"][:n]])
    seg = strategies.segment_ids([p.numel() for p in step_fn.shared])
    mask = torch.tensor(step_fn.net.model.attention_mask())
    inside = mask[seg]
    assert 0 < int(mask.sum()) < len(mask)  # the tiny UNet's mid-block attention: 10 tensors
    summed = 0.7 * local[0] + 0.3 * local[1]
    atol = 1e-6 * float(summed.abs().max())
    assert torch.allclose(u[~inside], summed[~inside], rtol=1e-5, atol=atol)
    ref, tel = strategies.combine("genrep", local[:, inside], seg[inside] if granularity == "tensor" else None)
    assert torch.allclose(u[inside], ref, rtol=1e-5, atol=atol)
    assert not torch.allclose(u[inside], summed[inside], rtol=1e-3)  # the rule acts there
    assert out["scope_tensors"] == pytest.approx(float(mask.double().mean()))
    sizes = torch.tensor([p.numel() for p in step_fn.shared], dtype=torch.float64)
    assert out["scope_params"] == pytest.approx(float(sizes[mask].sum() / sizes.sum()))
    assert out["scope_cos"] == pytest.approx(float(torch.cosine_similarity(
        local[0, inside].double(), local[1, inside].double(), 0)), rel=1e-6)
    assert out["scope_update_change"] > 0 and out["update_change"] < out["scope_update_change"]
    assert SEG_KEYS <= set(out)


def test_scope_attention_on_sum_is_the_one_backward_weighted_sum(group, tmp_path):
    """sum takes no task gradients: the scope changes nothing (documented as a no-op)."""
    raw = tiny_sweep(tmp_path, strategies=["sum"], scope="attention", method={"beta_kd": 0.0},
                     strategy_options={"sum": {"task_weights": [0.7, 0.3]}})
    step_fn = make_step(from_dict(raw).trials()[0], Shard(0, 1, BATCH), torch.device("cpu"))
    assert not step_fn.strategy.needs_task_grads
    assert "scope_cos" not in step_fn(*batch(3), 0)


@pytest.mark.parametrize("strategy", ["sum", "pcgrad"])
def test_perception_gradient_is_scaled_once_with_scarce_labels(group, tmp_path, monkeypatch, strategy):
    """Issue 31 ("Also"): is g_p scaled twice (labelled fraction × task weight × whole-batch
    division)? No. By hand, with 2 of the 8 rows labelled and task weights (0.7, 0.3):
    g_p = ∇ (1/B) Σ_{labelled} CE, i.e. (2/8)·∇(mean CE over the labelled rows): the labelled
    fraction once, by design (genrep.losses.cross_entropy: a labelled image weighs what it would in
    a full batch). The logged norm_p is ‖g_p‖ itself, before any task weight; the gradient the
    optimizer reads is w_p·g_p + w_g·g_g on the shared tensors (sum: (0.7, 0.3); pcgrad: the
    logged weights, task weights included once) and 0.7·g_p on the head."""
    raw = tiny_sweep(tmp_path, strategies=[strategy], strategy_options={strategy: {"task_weights": [0.7, 0.3]}},
                     method={"beta_kd": 0.0})
    step_fn = make_step(from_dict(raw).trials()[0], Shard(0, 1, BATCH), torch.device("cpu"))
    x, y = batch(2)
    y[2:] = -1  # 25% labelled
    model, labelled = step_fn.net.model, y >= 0
    logits = model.logits(x)
    ce_sum = torch.nn.functional.cross_entropy(logits[labelled], y[labelled], reduction="sum") / BATCH
    ce_mean = torch.nn.functional.cross_entropy(logits[labelled], y[labelled])
    params = step_fn.shared + step_fn.head
    g_p = parallel.flat(torch.autograd.grad(ce_sum, params, allow_unused=True, retain_graph=True), params)
    g_mean = parallel.flat(torch.autograd.grad(ce_mean, params, allow_unused=True), params)
    torch.testing.assert_close(g_p, 0.25 * g_mean)
    loss_g, _ = step_fn.generation_loss(model, x, y, 0)
    g_g = parallel.flat(torch.autograd.grad(loss_g, step_fn.shared, allow_unused=True), step_fn.shared)
    seen = {}
    real_step = parallel.optimizer_step

    def step_and_record(engine):  # the gradient the optimizer reads (ZeRO stage 0 on one rank)
        seen["grad"] = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                  for p in params])
        real_step(engine)

    monkeypatch.setattr(parallel, "optimizer_step", step_and_record)
    out = step_fn(x, y, 0)
    d = g_g.numel()
    if strategy == "pcgrad":
        assert out["norm_p"] == pytest.approx(float(g_p[:d].norm()), rel=1e-5)
        assert out["norm_g"] == pytest.approx(float(g_g.norm()), rel=1e-5)
        w_p, w_g = out["w_p"], out["w_g"]
        assert out["conflict"] == 0 and (w_p, w_g) == (0.7, 0.3)  # cos 0.02 here: no projection
    else:
        w_p, w_g = 0.7, 0.3
    torch.testing.assert_close(seen["grad"][:d], w_p * g_p[:d] + w_g * g_g, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(seen["grad"][d:], 0.7 * g_p[d:], rtol=1e-4, atol=1e-7)
