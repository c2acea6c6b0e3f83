"""Report on test, choose on val: the evaluation's config fields and checks, and one real
end-of-trial evaluation (packed digits, the real step, no Ray) that reports on test with the
guidance scale chosen on val."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.config import ConfigError, from_dict
from tests.conftest import tiny_sweep


def sweep(tmp_path, **eval_):
    return tiny_sweep(tmp_path, eval={"mc_k": 2, "mc_images": 8, "samples_per_class": 1,
                                      "ddim_steps": 2, **eval_})


def test_recommended_comparison_settings_validate(tmp_path):
    cfg = from_dict(sweep(tmp_path, split="test", mc_images="all", samples_per_class=50,
                          guidance_scale="auto", guidance_choices=[1, 2, 3]))
    e = cfg.eval
    assert (e.mc_images, e.guidance_scale, e.guidance_choices) == ("all", "auto", (1.0, 2.0, 3.0))
    assert e.guidance_by == "fd_ref" and e.guidance_samples_per_class is None


@pytest.mark.parametrize("eval_, where, msg", [
    ({"guidance_scale": "auto"}, "eval.guidance_scale", "set eval.split: test"),  # split val
    ({"guidance_scale": "high"}, "eval.guidance_scale", "expected"),
    ({"guidance_scale": -1.0}, "eval.guidance_scale", 'must be >= 0 or "auto"'),
    ({"mc_images": "most"}, "eval.mc_images", "expected"),
    ({"mc_images": 0}, "eval.mc_images", 'must be > 0 or "all"'),
    ({"guidance_choices": []}, "eval.guidance_choices", "non-empty"),
    ({"guidance_choices": [2, 2]}, "eval.guidance_choices", "distinct"),
    ({"guidance_by": "sample_acc"}, "eval.guidance_by", "must be one of"),
    ({"guidance_samples_per_class": 0}, "eval.guidance_samples_per_class", "must be > 0"),
])
def test_eval_fields_refused_with_their_names(tmp_path, eval_, where, msg):
    with pytest.raises(ConfigError, match=rf"{where}.*{msg}"):
        from_dict(sweep(tmp_path, **eval_))


def test_a_search_may_not_choose_on_the_test_split(tmp_path):
    raw = sweep(tmp_path, split="test")
    raw |= {"strategies": ["genrep"], "search": {
        "num_samples": 2, "space": {"method.beta_kd": {"type": "float", "low": 0.1, "high": 1.0}}}}
    with pytest.raises(ConfigError, match="eval.split: test with search"):
        from_dict(raw)
    raw["eval"]["split"] = "val"
    from_dict(raw)


@pytest.fixture(scope="module")
def group(gloo_group):
    """The one-rank gloo group of tests/conftest.py."""


@pytest.mark.slow
def test_trial_reports_on_test_with_guidance_chosen_on_val(tmp_path_factory, group):
    """evaluate_trial as the worker calls it: rows scored on the test split, the scale chosen by
    fd_ref on val (recomputed here from the val split), τ fitted on labelled training images, and
    the choice's forwards in eval_network_evals."""
    from harness.evaluate import choose_guidance, eval_mode, reference_classifier, sample_metrics
    from harness.data import load_split, resolve_dataset
    from harness.evaluate_trial import evaluate_trial
    from harness.step import Shard, make_step
    from harness.teacher import teacher_inputs

    tmp = tmp_path_factory.mktemp("evalsplit")
    cfg = from_dict(sweep(tmp, split="test", guidance_scale="auto", guidance_choices=[1.0, 3.0],
                          mc_images="all"))
    data = resolve_dataset(cfg)
    trial = cfg.trial("sum", 0)
    step_fn = make_step(trial, Shard(0, 1, trial.train.batch_size), torch.device("cpu"),
                        **teacher_inputs(trial, data, torch.device("cpu")))
    val_x, val_y = load_split(data.val)
    train_x, _ = load_split(data.train)
    test_x, _ = load_split(data.test)
    # τ: auto fits on the first calibrate_images of train (labels every arm has), never held out
    torch.testing.assert_close(step_fn.teacher.calibration[0], train_x[: trial.method.mc.calibrate_images])
    out = evaluate_trial(step_fn, trial, data, Shard(0, 1, trial.train.batch_size), torch.device("cpu"))

    # the cached reference classifier that evaluate_trial trained (no data needed to load it)
    ref, info = reference_classifier(Path(data.cache) / "reference", data.key,
                                     None, None, None, None, seed=0)
    assert info["ref_val_n"] == len(val_y)  # its own accuracy is on val, whichever split reports
    gen = step_fn.networks()["joint"].model
    with eval_mode(gen):
        chosen, scores, choice_evals = choose_guidance(gen, val_x, ref, (1.0, 3.0), 1, 2)
        report, sample_evals = sample_metrics(gen, test_x, ref, 1, 2, chosen, 0)
    assert out["guidance_scale"] == chosen
    assert out["fd_ref"] == pytest.approx(report["fd_ref"])
    n_test, c, k = len(test_x), 10, trial.eval.mc_k
    assert out["mc_evals_per_image"] == k * c and out["mc_acc_stderr"] > 0
    assert out["eval_network_evals"] == n_test * k * c + choice_evals + sample_evals + n_test * 4
