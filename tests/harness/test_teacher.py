"""harness.teacher: when τ is refitted (mc.tau: auto: gaps doubling from calibrate_first, capped),
and the teacher built with its inputs — calibration images from val, the class prior from the
manifest — by the step that owns it, never patched in afterwards."""
from types import SimpleNamespace

import pytest
import torch

from harness.config import from_dict
from harness.data import load_split, resolve_dataset
from harness.step import Shard, make_step
from harness.teacher import next_fit, teacher_inputs


def fits(first: int, every: int, until: int) -> list[int]:
    mc, out = SimpleNamespace(calibrate_first=first, calibrate_every=every), [0]
    while next_fit(out[-1], mc) < until:
        out.append(next_fit(out[-1], mc))
    return out


def test_gaps_double_from_the_first_then_stay_at_the_cap():
    assert fits(10, 500, 2000) == [0, 10, 20, 40, 80, 160, 320, 640, 1140, 1640]


def test_a_first_gap_equal_to_the_cap_is_a_fixed_interval():
    assert fits(100, 100, 350) == [0, 100, 200, 300]


@pytest.fixture(scope="module")
def group(gloo_group):
    """The one-rank gloo group of tests/conftest.py."""


def test_the_step_builds_its_teacher_with_val_images_and_the_training_prior(group, tiny):
    cfg = from_dict(tiny(method={"beta_kd": 1.0, "mc": {"k": 2, "every": 1, "subset": 1.0, "prior": "train",
                                                        "calibrate_images": 5}}))
    trial, data, cpu = cfg.trials()[0], resolve_dataset(cfg), torch.device("cpu")
    inputs = teacher_inputs(trial, data, cpu)
    val_x, val_y = load_split(data.val)
    torch.testing.assert_close(inputs["calibration"][0], val_x[:5])
    torch.testing.assert_close(inputs["calibration"][1], val_y[:5])
    assert inputs["prior"].tolist() == list(data.class_counts)
    teacher = make_step(trial, Shard(0, 1, trial.train.batch_size), cpu, **inputs).teacher
    assert teacher.calibration is inputs["calibration"] and teacher.prior is inputs["prior"]
    assert teacher.mc_options()["prior"] is inputs["prior"]


def test_a_fixed_tau_needs_no_calibration_and_a_urls_dataset_has_no_prior(tiny):
    cfg = from_dict(tiny(method={"mc": {"tau": 2.0}}))
    trial, data = cfg.trials()[0], resolve_dataset(cfg)
    assert teacher_inputs(trial, data, torch.device("cpu")) == {"calibration": None, "prior": None}
    no_counts = data.__class__(**{**data.plain(), "class_counts": None})
    prior = from_dict(tiny(method={"mc": {"prior": "train"}})).trials()[0]
    with pytest.raises(ValueError, match="prior: train needs the training split's class counts"):
        teacher_inputs(prior, no_counts, torch.device("cpu"))


def test_tau_auto_without_calibration_images_says_what_is_missing(group, tiny):
    trial = from_dict(tiny()).trials()[0]
    step_fn = make_step(trial, Shard(0, 1, trial.train.batch_size), torch.device("cpu"))
    x, y = torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="tau: auto needs calibration images"):
        step_fn(x, y, 0)
