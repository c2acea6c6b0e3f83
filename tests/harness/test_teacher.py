"""harness.teacher: when τ is refitted (mc.tau: auto: gaps doubling from calibrate_first, capped),
and the teacher built with its inputs — calibration images from the labelled training images, the
class prior from the manifest — by the step that owns it, never patched in afterwards; the
self-training control (mc.source: self) distils the EMA head's own tempered predictions."""
from types import SimpleNamespace

import pytest
import torch

from harness.config import from_dict
from harness.data import make_loader, resolve_dataset
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


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_the_step_builds_its_teacher_with_labelled_training_images_and_the_prior(group, tiny, fraction):
    """Calibration images are the first labelled *training* images in shard order (the labels the
    trial trains on, the same for every arm), never a held-out split; with a labelled fraction
    only the images the loader keeps labelled."""
    cfg = from_dict(tiny(data={"labelled_fraction": fraction, "label_seed": 3},
                         method={"beta_kd": 1.0, "mc": {"k": 2, "every": 1, "subset": 1.0, "prior": "train",
                                                        "calibrate_images": 5}}))
    trial, data, cpu = cfg.trials()[0], resolve_dataset(cfg), torch.device("cpu")
    inputs = teacher_inputs(trial, data, cpu)
    loader = make_loader(data.train, 512, drop_last=False, shuffle_shards=False,
                         labelled_fraction=fraction, label_seed=3)
    x, y = next(iter(loader))
    x, y = x[y >= 0][:5], y[y >= 0][:5]
    torch.testing.assert_close(inputs["calibration"][0], x)
    torch.testing.assert_close(inputs["calibration"][1], y)
    assert len(y) == 5 and inputs["prior"].tolist() == list(data.class_counts)
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


@pytest.mark.parametrize("strategy", ["sum", "separate"])
def test_the_self_training_control_distils_the_ema_heads_tempered_predictions(group, tiny, strategy):
    """source: self — q = softmax(z_ema/τ) on the rows the Bayes teacher would score, τ the NLL
    fit on the head's own logits of the calibration images; n head forwards, no diffusion ones.
    In separate it reads the perception network's EMA head (the generation network has no head
    worth distilling)."""
    from genrep.posterior import fit_temperature

    cfg = from_dict(tiny(strategies=[strategy], method={
        "beta_kd": 1.0, "mc": {"source": "self", "every": 2, "subset": 0.5, "calibrate_images": 6}}))
    trial, data, cpu = cfg.trials()[0], resolve_dataset(cfg), torch.device("cpu")
    step_fn = make_step(trial, Shard(0, 1, 8), cpu, **teacher_inputs(trial, data, cpu))
    net = step_fn.networks().get("joint") or step_fn.networks()["perception"]
    assert net.ema is not None  # self always reads an EMA copy, whatever mc.teacher says
    x, y = next(iter(make_loader(data.train, 8, shuffle_shards=False)))
    cx, cy = step_fn.teacher.calibration
    with torch.no_grad():
        tau = fit_temperature(net.ema.logits(cx), cy)
        want = torch.softmax(net.ema.logits(x[:4]) / tau, -1)
    q, m = step_fn.teacher.probs(net.teacher(), x, 0)
    torch.testing.assert_close(q, want)
    assert m == {"mc_evals": 4.0, "teacher_tau": pytest.approx(tau), "mc_stderr": 0.0}
    assert step_fn.teacher.probs(net.teacher(), x, 1)[0].shape == (0, 10)  # every 2nd step
    out = step_fn(x, y, 0)
    assert out["mc_evals"] == 4.0 and out["loss_kd"] > 0


def test_calibration_reads_the_labels_the_trial_trains_on(tiny):
    """With data.label_noise (the positive control) the calibration images carry the flipped
    labels, as the trial's own training batches do."""
    from harness.data.splits import label_noise

    cfg = from_dict(tiny(data={"label_noise": 0.4, "label_seed": 1}, method={"mc": {"calibrate_images": 40}}))
    trial, data = cfg.trials()[0], resolve_dataset(cfg)
    _, y = teacher_inputs(trial, data, torch.device("cpu"))["calibration"]
    want = next(iter(make_loader(data.train, 40, shuffle_shards=False, label_seed=1, **label_noise(trial))))[1]
    clean = next(iter(make_loader(data.train, 40, shuffle_shards=False)))[1]
    assert torch.equal(y, want) and not torch.equal(y, clean)
