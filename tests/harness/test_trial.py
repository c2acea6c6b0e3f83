"""What the Tune trainable and the Train controller import (their processes run per trial)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_trial_module_imports_none_of_the_worker_stack():
    """harness.trial is imported by the Tune trainable and, through the pickled train_loop, by the
    Train controller: neither process needs torch, DeepSpeed, diffusers or webdataset from it."""
    code = ("import sys, harness.trial as t; t.train_loop; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'diffusers', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"



def sweep_with_everything(tiny):
    from harness.config import from_dict

    return from_dict(tiny(seeds=[0, 1], grid={"train.lr": [0.001, 0.01]},
                          variants={"genrep_nokd": {"strategy": "genrep",
                                                    "overrides": {"method.beta_kd": 0.0}}}))


def no_sweep_checks(monkeypatch):
    """Make any sweep-level validation (strategies, options, model, combinations) fail loudly."""
    from harness.config import checks

    def boom(*args):
        raise AssertionError("the sweep was validated again")

    monkeypatch.setattr(checks, "cross_checks", boom)


def test_trials_resolve_shipped_arms_to_the_drivers_configs_without_revalidating(tiny, monkeypatch):
    from harness.trial import arm_configs, resolve

    cfg = sweep_with_everything(tiny)
    arms = arm_configs(cfg)
    no_sweep_checks(monkeypatch)
    for label in cfg.labels():
        for seed in cfg.seeds:
            for point in cfg.grid_points():
                params = {"variant": label, "seed": seed, "overrides": point}
                assert resolve(arms, params) == resolve(cfg, params) == cfg.arm(label, seed, point)


def test_run_trial_hands_its_workers_the_resolved_config(tiny, monkeypatch, tmp_path):
    """The Tune trainable neither reads the sweep file nor validates the sweep: it resolves its
    arm's shipped config and passes it on as a dict (harness.worker rebuilds it)."""
    import types

    import ray.tune

    from harness import trial
    from harness.config import trial_from_dict

    cfg = sweep_with_everything(tiny)
    arms = trial.arm_configs(cfg)
    no_sweep_checks(monkeypatch)
    monkeypatch.setattr(ray.tune, "get_context",
                        lambda: types.SimpleNamespace(get_trial_dir=lambda: str(tmp_path)))
    fitted = []
    monkeypatch.setattr(trial, "fit", lambda c, data, storage, name, in_tune, trial_dir, init_dir:
                        fitted.append((c, data, name, trial_dir, init_dir)))
    trial.run_trial({"variant": "genrep_nokd", "seed": 1, "overrides": {"train.lr": 0.01}}, arms,
                    {"train": []}, str(tmp_path))
    want = cfg.arm("genrep_nokd", 1, {"train.lr": 0.01})
    assert fitted == [(want, {"train": []}, f"train-{trial.trial_name(want)}", str(tmp_path), None)]
    assert trial_from_dict(want.to_dict()) == want  # what the worker does with it


def test_resolving_a_trial_imports_none_of_the_worker_stack(tiny, tmp_path):
    """A trial rebuilds its config from the shipped dict in pure Python: no genrep, no torch."""
    import json

    from harness.trial import arm_configs

    (tmp_path / "arms.json").write_text(json.dumps(arm_configs(sweep_with_everything(tiny))))
    code = ("import json, sys; from harness.trial import resolve; "
            f"arms = json.load(open({str(tmp_path / 'arms.json')!r})); "
            "t = resolve(arms, {'variant': 'genrep_nokd', 'seed': 1, 'overrides': {'train.lr': 0.01}}); "
            "print(t.hash(), sorted(m for m in ('torch', 'genrep') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    want = sweep_with_everything(tiny).arm("genrep_nokd", 1, {"train.lr": 0.01})
    assert out.stdout.split() == [want.hash(), "[]"]
