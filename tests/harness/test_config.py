"""The sweep schema: every shipped sweep validates; bad input names the file and the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError, from_dict, load, trial_from_dict
from tests.conftest import ROOT

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_sweeps_exist():
    assert any(p.name == "smoke.yaml" for p in SWEEPS)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path):
    cfg = load(path)
    assert cfg.trials(), path
    for trial in cfg.trials():
        assert trial_from_dict(trial.to_dict()) == trial  # crosses Ray as a dict, losslessly


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("section, patch, field, words", [
    (None, {"bogus": 1}, "bogus", "unknown field"),
    ("train", {"stpes": 10}, "train.stpes", "unknown field"),
    ("train", {"steps": "ten"}, "train.steps", "expected an integer"),
    ("train", {"steps": 0}, "train.steps", "must be > 0"),
    ("train", {"batch_size": -8}, "train.batch_size", "must be > 0"),
    ("method", {"mc": {"k": 0}}, "method.mc.k", "must be > 0"),
    ("method", {"p_uncond": 1.5}, "method.p_uncond", "[0, 1)"),
    ("deepspeed", {"zero_stage": 5}, "deepspeed.zero_stage", "0, 1, 2 or 3"),
    ("deepspeed", {"precision": "fp8"}, "deepspeed.precision", "must be one of"),
    ("data", {"split": [0.5, 0.5]}, "data.split", "expected 3 values"),
    ("data", {"image_size": 0}, "data.image_size", "must be > 0"),
    (None, {"strategies": ["sum", "adam"]}, "strategies", "unknown strategy 'adam'"),
    (None, {"strategy_options": {"genrep": {"lamda": 0.1}}}, "strategy_options.genrep", "lamda"),
    (None, {"strategy_options": {"genrep": {"damping": 2.0}}}, "strategy_options.genrep", "damping"),
    (None, {"seeds": []}, "seeds", "non-empty"),
    ("model", {"overrides": {"widht": 3}}, "model.overrides.widht", "unknown field"),
    ("resources", {"workers": 3}, "train.batch_size", "not divisible"),
    ("method", {"use_ce": False, "beta_kd": 0.0}, "method", "no perception loss"),
])
def test_bad_field_names_file_and_field(tmp_path, tiny, section, patch, field, words):
    raw = tiny()
    if section is None:
        raw.update(patch)
    else:
        raw[section] = {**raw.get(section, {}), **patch}
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert str(path) in msg and field in msg and words in msg, msg


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML"):
        load(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="no such sweep file"):
        load(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load(path)


def test_defaults_and_trials(tiny):
    cfg = from_dict(tiny(strategies=["sum", "genrep", "separate"], seeds=[0, 1]))
    trials = cfg.trials()
    assert [(t.strategy.name, t.seed) for t in trials] == [
        ("sum", 0), ("sum", 1), ("genrep", 0), ("genrep", 1), ("separate", 0), ("separate", 1)]
    assert len({t.hash() for t in trials}) == 6
    assert cfg.train.grad_clip == 0.0  # never DeepSpeed's silent default of 1.0


def test_validate_command(tmp_path, tiny, capsys):
    from harness.cli import main

    assert main(["validate", str(ROOT / "sweeps" / "smoke.yaml")]) == 0
    assert "4 trials" in capsys.readouterr().out
    raw = tiny()
    raw["train"]["steps"] = -1
    assert main(["validate", str(write(tmp_path, raw))]) == 2
    assert "train.steps" in capsys.readouterr().err
