"""harness.warmstart, in process: the pretrain's own trial, its cache key, a user's checkpoint
checked against the model, and every network of a step starting from the warm start's backbone
while its heads keep the trial's seed. The Ray end to end (pretrain once, reuse, a damaged cache)
is tests/harness/test_sweep.py::test_a_warm_started_sweep_pretrains_once_and_every_trial_starts_from_it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from genrep.model import build_model
from genrep.pretrained import diffusers_network, save_backbone
from harness.config import ConfigError, from_dict
from harness.data import resolve_dataset
from harness.step import Shard, make_step
from harness.warmstart import cache_key, pretrain_trial, resolve_init


def warm(tiny, **pretrain):
    return from_dict(tiny(init={"pretrain": {"steps": 5, **pretrain}},
                          strategy_options={"genrep": {"task_weights": [0.7, 0.3]}}))


def test_the_pretrain_is_the_sweeps_trial_on_the_generation_loss(tiny):
    sweep = warm(tiny, seed=3)
    t = pretrain_trial(sweep)
    assert (t.variant, t.seed, t.train.steps, t.strategy.name) == ("pretrain", 3, 5, "sum")
    assert t.strategy.options == {"task_weights": [0.0, 1.0]} and t.method.beta_kd == 0.0
    assert not t.init.on and not t.method.semantic.on and t.eval.every == 0
    assert pretrain_trial(warm(tiny, loss="joint")).strategy.options == {"task_weights": [1.0, 1.0]}
    assert t.model == sweep.trial("sum", 0).model and t.data == sweep.data


def test_the_cache_key_follows_the_run_and_the_data_not_the_sweeps_name(tiny, tmp_path):
    sweep = warm(tiny)
    data = resolve_dataset(sweep)
    key = cache_key(pretrain_trial(sweep), data)
    renamed = dataclasses.replace(sweep, name="other", output_dir=str(tmp_path / "elsewhere"))
    assert cache_key(pretrain_trial(renamed), data) == key
    assert cache_key(pretrain_trial(warm(tiny, steps=6)), data) != key
    assert cache_key(pretrain_trial(sweep), dataclasses.replace(data, key="other-data")) != key


def test_a_users_checkpoint_is_checked_against_the_model(tiny, tmp_path):
    sweep = from_dict(tiny())
    model = build_model(sweep.trial("sum", 0).model_config(), seed=0)
    save_backbone(model, tmp_path / "mine")
    ok = from_dict(tiny(init={"path": str(tmp_path / "mine")}))
    assert resolve_init(ok, resolve_dataset(ok), str(tmp_path))["dir"] == str(tmp_path / "mine")
    other = from_dict(tiny(init={"path": str(tmp_path / "mine")},
                           model={"preset": "digits16", "overrides": {**sweep.model.overrides, "num_classes": 5}}))
    with pytest.raises(ConfigError, match=r"init.path: .*num_class_embeds: checkpoint 11, model 6"):
        resolve_init(other, resolve_dataset(other), str(tmp_path))
    with pytest.raises(ConfigError, match="init.path: .* no save_pretrained directory"):
        from_dict(tiny(init={"path": str(tmp_path)}))
    with pytest.raises(ConfigError, match="init: give pretrain .* or path"):
        from_dict(tiny(init={"path": str(tmp_path / "mine"), "pretrain": {"steps": 2}}))
    with pytest.raises(ConfigError, match="init.pretrain.steps: must be > 0"):
        from_dict(tiny(init={"pretrain": {"steps": 0}}))
    with pytest.raises(ConfigError, match="variants.v.overrides.init.path: .*cannot be overridden"):
        from_dict(tiny(variants={"v": {"strategy": "sum", "overrides": {"init.path": "x"}}}))


@pytest.fixture(scope="module")
def group(gloo_group):
    """The one-rank gloo group of tests/conftest.py."""


@pytest.mark.parametrize("strategy", ["genrep", "separate"])
def test_every_network_starts_from_the_backbone_and_the_heads_from_the_seed(group, tiny, tmp_path, strategy):
    sweep = from_dict(tiny(strategies=[strategy], method={"beta_kd": 0.0}))
    source = build_model(sweep.trial(strategy, 0).model_config(), seed=123)
    save_backbone(source, tmp_path / "init")
    want = diffusers_network(source).state_dict()
    heads = []
    for seed in (0, 1):
        trial = sweep.trial(strategy, seed)
        step_fn = make_step(trial, Shard(0, 1, 8), torch.device("cpu"), init_dir=str(tmp_path / "init"))
        for name, net in step_fn.networks().items():
            got = diffusers_network(net.model).state_dict()
            assert all(torch.equal(got[k], v) for k, v in want.items()), name
        heads.append(next(iter(step_fn.networks().values())).model.head.state_dict())
    assert any(not torch.equal(v, heads[1][k]) for k, v in heads[0].items())  # seed 0 vs seed 1
