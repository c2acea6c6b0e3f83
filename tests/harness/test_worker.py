"""Determinism: the same config and seed give bitwise-identical training metrics; a resume is exact.

The real training step (DeepSpeed engines on a one-process gloo group, the real shard loader) in
this process, without Ray: cheap enough to compare several strategies. The Ray path (restart of a
killed worker from its checkpoint = an undisturbed run) is proved in test_faults.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness.config import from_dict
from harness.data import make_loader
from harness.step import Shard, make_step
from harness.data import forever, resolve_dataset
from harness.teacher import teacher_inputs
from harness.worker import Window, load_checkpoint, save_checkpoint
from tests.conftest import tiny_sweep

STEPS = 4
# wall-clock and memory metrics are not expected to repeat; everything else must, bitwise
NOT_DETERMINISTIC = {"step_time", "images_per_s", "rss_mb", "eval_seconds", "startup_s", "train_s"}


@pytest.fixture(scope="module")
def group(gloo_group):
    """The one-rank gloo group of tests/conftest.py."""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, group):
    """A tiny sweep (ema teacher, stateful gradvac rule) and its packed shards."""
    raw = tiny_sweep(tmp_path_factory.mktemp("det"), strategies=["sum", "genrep", "separate"],
                     seeds=[0, 1], strategy_options={"genrep": {"rule": "gradvac", "damping": 0.5}})
    raw["method"] = {**raw["method"], "mc": {"k": 2, "teacher": "ema"}}
    raw["data"] = {**raw["data"], "shuffle_buffer": 32}
    cfg = from_dict(raw)
    return cfg, resolve_dataset(cfg)


def make_run(cfg, urls, strategy: str, seed: int):
    """A trial's step function and training loader, built as harness.worker.train_loop builds them."""
    trial = cfg.trial(strategy, seed)
    shard = Shard(0, 1, trial.train.batch_size)
    step_fn = make_step(trial, shard, torch.device("cpu"),
                        **teacher_inputs(trial, urls, torch.device("cpu")))
    loader = make_loader(urls.train, shard.local, seed=trial.seed,
                         shuffle_buffer=trial.data.shuffle_buffer, image_size=trial.data.image_size)
    return step_fn, loader


def train(step_fn, loader, start: int, stop: int) -> list[dict[str, float]]:
    batches = forever(loader)
    out = []
    for step in range(start, stop):
        x, y = next(batches)
        metrics = step_fn(x, y, step)
        out.append({k: float(v) for k, v in metrics.items() if k not in NOT_DETERMINISTIC})
    return out


@pytest.mark.parametrize("strategy", ["sum", "genrep", "separate"])
def test_same_seed_same_metrics_other_seed_differs(sweep, strategy):
    cfg, urls = sweep
    first = train(*make_run(cfg, urls, strategy, 0), 0, STEPS)
    again = train(*make_run(cfg, urls, strategy, 0), 0, STEPS)
    other = train(*make_run(cfg, urls, strategy, 1), 0, STEPS)
    assert first == again  # bitwise: float == float on every metric of every step
    assert {"loss_gen", "loss_perc", "acc"} <= set(first[0])
    assert first[-1]["loss_gen"] != other[-1]["loss_gen"]
    assert first[-1]["loss_perc"] != other[-1]["loss_perc"]


@pytest.mark.parametrize("strategy", ["genrep", "separate"])
def test_resume_from_checkpoint_is_bitwise_exact(sweep, strategy, tmp_path):
    """Stop after 2 steps, checkpoint, rebuild everything, load, go on: = 5 steps straight.

    Covers the engines (weights, Adam moments), the EMA teacher, the gradvac running state and the
    loader position (seeded shuffle buffer): any one of them left out changes the metrics."""
    cfg, urls = sweep
    straight = train(*make_run(cfg, urls, strategy, 0), 0, 5)
    step_fn, loader = make_run(cfg, urls, strategy, 0)
    head = train(step_fn, loader, 0, 2)
    timed = Window()
    timed.add({"step_time": 0.25, "mc_evals": 3.0})
    save_checkpoint(tmp_path, step_fn, loader, 2, timed)
    step_fn, loader = make_run(cfg, urls, strategy, 0)
    restored = Window()
    assert load_checkpoint(tmp_path, step_fn, loader, restored) == 2
    assert restored.state_dict() == timed.state_dict()  # the run's running means come back
    assert head + train(step_fn, loader, 2, 5) == straight


def test_distillation_term_is_averaged_over_the_whole_batch(sweep):
    """A scored image's target weighs what its label does: L_ce + β·(n/B)·L_kd(first n), for a
    teacher that scored n = 2 of B = 8 images (harness.step.Step.perception_loss)."""
    from harness.config import apply_overrides
    from genrep.losses import cross_entropy, distillation_loss

    cfg, urls = sweep
    trial = apply_overrides(cfg.trial("sum", 0), {"method.beta_kd": 0.5})
    step_fn = make_step(trial, Shard(0, 1, trial.train.batch_size), torch.device("cpu"))
    x, y = next(forever(make_loader(urls.train, 8, seed=0)))
    q = torch.softmax(torch.randn(2, 10, generator=torch.Generator().manual_seed(0)), -1)
    model = step_fn.net.model
    with torch.no_grad():
        loss, metrics = step_fn.perception_loss(model, x, y, q)
        logits = model.logits(x)
        ce, _ = cross_entropy(logits, y)
        kd, _ = distillation_loss(logits[:2], q, trial.method.tau_kd)
    assert torch.allclose(loss, ce + 0.5 * (2 / 8) * kd, atol=1e-6)
    assert torch.allclose(metrics["loss_kd"], kd)  # the logged term stays the scored images' mean


def test_one_rank_runs_zero_stage_0_with_the_same_parameters(sweep):
    """ZeRO-1 on one data-parallel rank partitions nothing: the engine runs stage 0 (what the
    flat-buffer copies cost: perf P1), and the parameters equal those of the kept stage 1."""
    from harness.config import apply_overrides

    cfg, urls = sweep
    params = {}
    for keep in (False, True):
        trial = apply_overrides(cfg.trial("sum", 0), {"deepspeed.zero_stage": 1,
                                                     "deepspeed.zero_on_one_rank": keep})
        step_fn = make_step(trial, Shard(0, 1, trial.train.batch_size), torch.device("cpu"),
                            **teacher_inputs(trial, urls, torch.device("cpu")))
        loader = make_loader(urls.train, trial.train.batch_size, seed=0)
        assert step_fn.net.engine.zero_optimization_stage() == (1 if keep else 0)
        train(step_fn, loader, 0, 3)
        params[keep] = torch.cat([p.detach().reshape(-1) for p in step_fn.net.model.parameters()])
    assert (params[False] - params[True]).abs().max().item() < 1e-6


def test_reverse_chain_teacher_is_deterministic_and_calibrated(sweep):
    """GenRep's reverse-chain estimator as the teacher (a 6-step chain, burn-in 2, thin 2): the
    same seed gives bitwise the same metrics, τ is fitted, and the distillation term is there."""
    from harness.config import apply_overrides

    cfg, urls = sweep
    chain = {"method.mc.estimator": "reverse_chain", "method.mc.chain_steps": 6,
             "method.mc.burn_in": 2, "method.mc.thin": 2}
    runs = []
    for _ in range(2):
        trial = apply_overrides(cfg.trial("sum", 0), chain)
        step_fn = make_step(trial, Shard(0, 1, trial.train.batch_size), torch.device("cpu"),
                            **teacher_inputs(trial, urls, torch.device("cpu")))
        loader = make_loader(urls.train, trial.train.batch_size, seed=0)
        runs.append(train(step_fn, loader, 0, 2))
    assert runs[0] == runs[1]
    first = runs[0][0]
    assert first["teacher_tau"] > 0 and "loss_kd" in first
    # n·kept·C for the n = round(subset·B) = 1 scored image: kept states 2 and 4; the tied chain
    # (method.mc.chain's default) steps with x and ε*, no network forwards
    assert first["mc_evals"] == 1 * 2 * 10


def test_the_teacher_passes_chain_start_to_its_chain(sweep, monkeypatch):
    """method.mc.chain_start reaches genrep.reverse_chain: the teacher's chain starts there."""
    import genrep.reverse_chain as rc
    from harness.config import apply_overrides

    cfg, urls = sweep
    seen = []
    real = rc.chain_timesteps
    monkeypatch.setattr(rc, "chain_timesteps", lambda *a: seen.append(a) or real(*a))
    trial = apply_overrides(cfg.trial("sum", 0), {
        "method.mc.estimator": "reverse_chain", "method.mc.chain_steps": 6, "method.mc.burn_in": 2,
        "method.mc.thin": 2, "method.mc.chain_start": 300})
    step_fn = make_step(trial, Shard(0, 1, trial.train.batch_size), torch.device("cpu"),
                        **teacher_inputs(trial, urls, torch.device("cpu")))
    train(step_fn, make_loader(urls.train, trial.train.batch_size, seed=0), 0, 1)
    assert seen and all(a[2] == 300 for a in seen)


def test_images_per_s_is_total_images_over_total_time():
    """Steps of 0.1, 0.3, 0.2 and 0.4 s at batch 32: 128 images in 1.0 s = 128 images/s, not the
    mean of the per-step rates (320 + 106.7 + 160 + 80)/4 = 166.7; a resumed run's running sums
    carry on (the checkpointed Window), and before any step there is no rate."""
    from harness.worker import images_per_s

    timed = Window()
    assert math.isnan(images_per_s(timed, 32))
    for dt in (0.1, 0.3):
        timed.add({"step_time": dt, "mc_evals": 0.0})
    assert images_per_s(timed, 32) == pytest.approx(64 / 0.4)  # 160, not (320 + 106.7)/2
    resumed = Window()
    resumed.load_state_dict(timed.state_dict())
    for dt in (0.2, 0.4):
        resumed.add({"step_time": dt, "mc_evals": 0.0})
    assert images_per_s(resumed, 32) == pytest.approx(128.0)
