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
    cfg = load(path).config
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
    ("method", {"mc": {"burn_in": 200}}, "method.mc.burn_in", "leaves no state"),
    ("method", {"mc": {"chain_steps": 20, "burn_in": 2, "chain_start": 10}}, "method.mc.chain_start",
     "below chain_steps"),
    ("method", {"mc": {"chain_start": 1000}}, "method.mc.chain_start", "[0, 999]"),
    # the tied chain (the default) keeps ε* fixed at η = 0: every kept state the same draw
    ("method", {"mc": {"eta": 0.0}}, "method.mc.chain", "method.mc.eta > 0"),
    ("method", {"mc": {"chain": "walk"}}, "method.mc.chain", "must be one of"),
    ("method", {"mc": {"aggregate": "lme"}}, "method.mc.aggregate", "must be one of"),
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


def test_the_free_chain_takes_eta_zero_and_the_tied_one_is_the_default(tmp_path, tiny):
    raw = tiny()
    mc = load(write(tmp_path, raw)).config.method.mc
    assert (mc.chain, mc.aggregate, mc.eta) == ("tied", "noise_lme", 1.0)
    raw["method"] = {**raw.get("method", {}), "mc": {"chain": "free", "eta": 0.0, "aggregate": "x0_lme"}}
    mc = load(write(tmp_path, raw)).config.method.mc
    assert (mc.chain, mc.aggregate, mc.eta) == ("free", "x0_lme", 0.0)


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


@pytest.mark.parametrize("overrides, field, words", [
    ({"block_out_channels": [8, -16]}, "model.overrides.block_out_channels", "integers > 0"),
    ({"block_out_channels": "wide"}, "model.overrides.block_out_channels", "expected a list"),
    ({"image_size": 10}, "model.overrides.image_size", "not divisible by 2^(levels - 1) = 4"),
    ({"block_out_channels": [8] * 6}, "model.overrides.block_out_channels", "= 32"),
    ({"norm_num_groups": 5}, "model.overrides.norm_num_groups", "does not divide"),
    ({"head": "conv"}, "model.overrides.head", "linear or mlp"),
    ({"t_perception": 1000}, "model.overrides.t_perception", "[0, 1000)"),
    ({"t_perception": 2.5}, "model.overrides.t_perception", "expected an integer"),
    ({"attention": "yes"}, "model.overrides.attention", "expected true/false"),
    ({"backbone": "vit"}, "model.overrides.backbone", "unknown backbone 'vit'"),
    ({"backbone": "dit", "dit_patch": 3}, "model.overrides.dit_patch", "not divisible by dit_patch 3"),
    ({"num_classes": 0}, "model.overrides.num_classes", "must be > 0"),
])
def test_bad_model_override_names_file_and_field(tmp_path, tiny, overrides, field, words):
    """Overrides of the preset are checked by type and range at load time, not in the worker."""
    path = write(tmp_path, tiny(model={"preset": "digits16", "overrides": overrides}))
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and field in msg and words in msg, msg


def test_validate_refuses_zero_stage_3_before_ray(tmp_path, tiny, capsys):
    """ZeRO-3 was refused only inside the worker; validate (and sweep, before Ray) refuse it now,
    with the engine's reason."""
    from harness.cli import main

    path = write(tmp_path, tiny(deepspeed={"zero_stage": 3}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: deepspeed.zero_stage: 3 is not supported" in err and "engine.module" in err, err
    assert main(["sweep", str(path)]) == 2  # refused before Ray starts or anything is written
    assert "deepspeed.zero_stage" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_unknown_strategy_before_ray(tmp_path, tiny, capsys):
    from harness.cli import main

    assert main(["train", str(write(tmp_path, tiny())), "--strategy", "adam"]) == 2
    err = capsys.readouterr().err
    assert "--strategy: unknown 'adam'" in err and "separate" in err, err


def test_plain_is_the_template_that_yaml_writes_and_from_dict_takes_back(tiny):
    """SweepConfig.plain(): the sweep without grid, variants, search, preregistration and source
    file, lists for tuples (perf writes it as YAML; check_override re-validates it)."""
    cfg = from_dict(tiny(grid={"train.lr": [0.001, 0.01]},
                         variants={"sum_nokd": {"strategy": "sum", "overrides": {"method.beta_kd": 0.0}}}))
    plain = cfg.plain()
    assert not {"grid", "variants", "search", "preregistration", "source_file"} & set(plain)
    assert from_dict(yaml.safe_load(yaml.safe_dump(plain))) == from_dict(tiny())


# ---------------------------------------------------------------- one read per command
class RayStarts(Exception):
    """Raised where a command would start Ray: the command got that far."""


def ray_starts(*args, **kwargs):
    raise RayStarts


def yaml_parses(monkeypatch, path: Path) -> list[str]:
    """The loader of every YAML parse of ``path``'s text from now on (yaml.safe_load and the other
    helpers call yaml.load)."""
    text, parses, real = path.read_text(), [], yaml.load

    def counted(stream, Loader):
        if stream == text or getattr(stream, "name", None) == str(path):
            parses.append(Loader.__name__)
        return real(stream, Loader)

    monkeypatch.setattr(yaml, "load", counted)
    return parses


@pytest.mark.parametrize("command", [["sweep"], ["train", "--strategy", "genrep"], ["validate"]],
                         ids=lambda c: c[0])
def test_a_command_parses_the_sweep_file_once(tmp_path, tiny, monkeypatch, command):
    """validate, and sweep and train up to where Ray starts: one parse, by the loader that refuses
    duplicate keys; the sweep's resume snapshot is that parse's mapping, not a second read."""
    import json

    from harness import sweep
    from harness.cli import main

    monkeypatch.setattr(sweep, "init_ray", ray_starts)
    path = write(tmp_path, tiny())
    parses = yaml_parses(monkeypatch, path)
    argv = [command[0], str(path), *command[1:]]
    if command[0] == "validate":
        assert main(argv) == 0
    else:
        with pytest.raises(RayStarts):
            main(argv)
    assert parses == ["_UniqueKeyLoader"]
    if command[0] == "sweep":
        assert json.loads((tmp_path / "out" / "ray" / "sweep.json").read_text()) == tiny()


def test_sweep_and_train_refuse_a_duplicate_key_before_ray(tmp_path, tiny, monkeypatch, capsys):
    """The resume guard once re-read the file with yaml.safe_load, which silently keeps the last of
    two equal keys; every command now reads it once, through the refusing loader."""
    from harness import sweep
    from harness.cli import main

    monkeypatch.setattr(sweep, "init_ray", ray_starts)
    path = write(tmp_path, yaml.safe_dump(tiny()) + "train: {steps: 1}\n")
    for argv in (["sweep", str(path)], ["train", str(path), "--strategy", "sum"]):
        assert main(argv) == 2
        assert "duplicate key 'train'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
