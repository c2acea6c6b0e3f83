"""strategy.scope (issue 30): a sweep-level field like granularity, overridable by a variant or a
grid as strategy.scope, and refused where the model has no attention tensors."""
from __future__ import annotations

import pytest

from harness.config import ConfigError, from_dict
from tests.conftest import tiny_sweep


def test_scope_defaults_to_all_and_reaches_every_trial(tmp_path):
    assert {t.strategy.scope for t in from_dict(tiny_sweep(tmp_path)).trials()} == {"all"}
    cfg = from_dict(tiny_sweep(tmp_path, scope="attention"))
    assert {t.strategy.scope for t in cfg.trials()} == {"attention"}


def test_a_variant_or_a_grid_overrides_strategy_scope(tmp_path):
    raw = tiny_sweep(tmp_path, strategies=["genrep"],
                     variants={"full_attn": {"strategy": "genrep",
                                             "overrides": {"strategy.scope": "attention",
                                                           "strategy.granularity": "tensor"}}})
    cfg = from_dict(raw)
    arm = cfg.arm("full_attn", 0)
    assert (arm.strategy.scope, arm.strategy.granularity) == ("attention", "tensor")
    assert cfg.arm("genrep", 0).strategy.scope == "all"
    grid = from_dict(tiny_sweep(tmp_path, strategies=["pcgrad"], grid={"strategy.scope": ["all", "attention"]}))
    assert [t.strategy.scope for t in grid.trials()] == ["all", "attention"]


def test_an_unknown_scope_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="scope"):
        from_dict(tiny_sweep(tmp_path, scope="heads"))
    raw = tiny_sweep(tmp_path, variants={"v": {"strategy": "genrep", "overrides": {"strategy.scope": "heads"}}})
    with pytest.raises(ConfigError, match="variants.v.overrides.strategy.scope"):
        from_dict(raw)


def test_scope_attention_on_a_model_without_attention_is_refused(tmp_path, monkeypatch):
    import genrep.model

    monkeypatch.setattr(genrep.model, "attention_size", lambda cfg: (0, 0))
    with pytest.raises(ConfigError, match=r"scope: attention.*no attention tensors"):
        from_dict(tiny_sweep(tmp_path, scope="attention"))
    raw = tiny_sweep(tmp_path, variants={"v": {"strategy": "genrep", "overrides": {"strategy.scope": "attention"}}})
    with pytest.raises(ConfigError, match=r"variants.v.overrides.strategy.scope.*no attention tensors"):
        from_dict(raw)
    from_dict(tiny_sweep(tmp_path))  # scope: all needs none


def test_attention_size_counts_the_attention_modules():
    from genrep.model import attention_size, preset

    assert attention_size(preset("digits16")) == (10, 16768)  # the UNet's mid block
    assert attention_size(preset("digits16", attention=True)) == (40, 67072)
    assert attention_size(preset("digits16", block_out_channels=[32, 64, 64])) == (10, 16768)  # a YAML list
    # attention_levels: attention blocks at the lowest n levels (digits16 has 3)
    assert attention_size(preset("digits16", attention=True, attention_levels=2)) == (70, 117376)
    assert attention_size(preset("digits16", attention=True, attention_levels=3)) == (100, 130240)


def test_attention_levels_needs_attention_and_at_most_the_unet_levels(tmp_path):
    model = lambda **o: tiny_sweep(tmp_path, model={"preset": "digits16", "overrides": o})  # noqa: E731
    from_dict(model(attention=True, attention_levels=2))
    with pytest.raises(ConfigError, match="model.overrides.attention_levels: attention_levels > 1 needs attention"):
        from_dict(model(attention_levels=2))
    with pytest.raises(ConfigError, match="model.overrides.attention_levels: attention_levels 4 exceeds"):
        from_dict(model(attention=True, attention_levels=4))
    with pytest.raises(ConfigError, match="model.overrides.attention_levels"):
        from_dict(model(attention=True, attention_levels=0))


def test_the_one_sided_arm_aligns_the_generation_gradient_in_every_sweep():
    """The paper's one-sided ablation aligns only g_g (genrep/strategies/genrep.py, docs/method.md):
    an arm named `onesided` runs align: generation; the perception side is ours, `onesided_p`."""
    from genrep.strategies import get
    from harness.config import load
    from tests.conftest import ROOT

    seen = set()
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        cfg = load(path).config
        for label in cfg.labels():
            trial = cfg.arm(label, cfg.seeds[0])
            if trial.strategy.name != "genrep":
                continue
            align = get("genrep").check_options(trial.strategy.options)["align"]
            if label.startswith("onesided"):
                seen.add(path.name)
                assert align == ("perception" if label == "onesided_p" else "generation"), (path, label)
            elif align == "perception":
                raise AssertionError(f"{path.name}: {label} aligns the perception side only; name it onesided_p")
    assert seen == {"ablation.yaml", "ablation_warm.yaml", "gpu_ablation.yaml"}
