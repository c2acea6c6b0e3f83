"""Two training stages and semantic-driven generation in the harness (issue 21).

- config: ``method.semantic`` and ``train.stage1_steps`` are checked at load time, naming the file
  and the field; the model gets its semantic module from them, never from an override;
- the schedule: stage 1 is perception alone (no teacher, no generation loss), the semantic network
  is the unified network at the switch and its EMA after every stage-2 step, stage 2 reports the
  semantic loss's terms;
- a checkpoint taken in either stage resumes bitwise (weights, Adam, the semantic copy);
- evaluation: the held-out loss of the modulated ε reads x_sem as the sampler does; the samplers
  (``eval.samplers``: ddim at η = 0, ddpm at η = 1, where the σ factor acts) report side by side.

The real training step (DeepSpeed engines on a one-process gloo group) on a tiny UNet, without
Ray or the shard loader: every step's batch is drawn from the step index.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from harness.config import ConfigError, apply_overrides, from_dict, load
from harness.parallel import load_checkpoint, save_checkpoint
from harness.step import Shard, make_step

SEMANTIC = {"method.semantic.enabled": True, "method.semantic.rep_align": 0.5,
            "method.semantic.ema_decay": 0.9, "train.stage1_steps": 2}


@pytest.fixture(scope="module")
def group(gloo_group):
    """The one-rank gloo group of tests/conftest.py."""


def trial(tiny, strategy: str = "genrep", **overrides):
    return apply_overrides(from_dict(tiny()).trial(strategy, 0), overrides)


def batch(step: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def build(cfg):
    # method.mc.tau: auto fits τ on labelled images
    return make_step(cfg, Shard(0, 1, cfg.train.batch_size), torch.device("cpu"), calibration=batch(-1))


def run(step_fn, start: int, stop: int) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in step_fn(*batch(s), s).items()} for s in range(start, stop)]


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# ---------------------------------------------------------------- config
def test_defaults_leave_the_model_and_the_trial_as_they_were(tiny):
    cfg = trial(tiny)
    assert not cfg.method.semantic.on and cfg.train.stage1_steps == 0
    assert cfg.eval.samplers == ("ddim",)  # the reported samples are η = 0 DDIM's, as before
    assert cfg.model_config().semantic is False
    assert trial(tiny, **{"method.semantic.enabled": True}).model_config().semantic is True
    rep = trial(tiny, **{"method.semantic.rep_align": 0.5})  # rep-align alone needs the module too
    assert rep.model_config().semantic is True and not rep.method.semantic.enabled


def write(tmp_path, raw):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("sections, field, words", [
    ({"train": {"stage1_steps": 4}}, "train.stage1_steps", "must be < train.steps = 4"),
    ({"train": {"stage1_steps": -1}}, "train.stage1_steps", "must be >= 0"),
    ({"method": {"semantic": {"rep_align": -0.5}}}, "method.semantic.rep_align", "must be >= 0"),
    ({"method": {"semantic": {"vlb_weight": -1}}}, "method.semantic.vlb_weight", "must be >= 0"),
    ({"method": {"semantic": {"ema_decay": 1.0}}}, "method.semantic.ema_decay", "[0, 1)"),
    ({"method": {"semantic": {"inference": "x0"}}}, "method.semantic.inference", "must be one of"),
    ({"method": {"semantic": {"train_source": "x0_bar"}}}, "method.semantic.train_source", "must be one of"),
    ({"method": {"semantic": {"vlb_weighting": "uniform"}}}, "method.semantic.vlb_weighting",
     "must be one of"),
    ({"eval": {"samplers": ["ddim", "ddpm", "ddim"]}}, "eval.samplers", "distinct"),
    ({"eval": {"samplers": ["dpm"]}}, "eval.samplers", "must be one of"),
    ({"eval": {"ddpm_steps": 1001}}, "eval.ddpm_steps", "[1, 1000]"),
    ({"model": {"preset": "digits16", "overrides": {"sem_width": 0}}}, "model.overrides.sem_width",
     "must be > 0"),
    ({"method": {"semantic": {"enable": True}}}, "method.semantic.enable", "unknown field"),
    ({"model": {"preset": "digits16", "overrides": {"semantic": True}}}, "model.overrides.semantic",
     "set by method.semantic"),
    ({"strategies": ["sum", "separate"], "method": {"semantic": {"enabled": True}}},
     "method.semantic.enabled", "strategy 'separate': its two networks share nothing"),
    ({"strategies": ["separate"], "train": {"stage1_steps": 2}}, "train.stage1_steps",
     "strategy 'separate'"),
    ({"strategies": ["sum"], "variants": {"sep": {"strategy": "separate"}},
      "method": {"semantic": {"rep_align": 0.5}}}, "method.semantic.rep_align", "'separate'"),
    ({"strategies": ["sum", "separate"], "grid": {"method.semantic.enabled": [False, True]}},
     "grid.method.semantic.enabled", "'separate'"),
    ({"method": {"use_ce": False, "beta_kd": 1.0}, "train": {"stage1_steps": 2}},
     "train.stage1_steps", "no loss"),
])
def test_bad_semantic_settings_name_file_and_field(tmp_path, tiny, sections, field, words):
    raw = tiny()
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and field in msg and words in msg, msg


def test_x_sem_is_read_in_training_as_at_sampling_unless_told(tiny):
    """train_source null follows inference (x̂_0 by default); x0 is the clean-image ablation."""
    sem = trial(tiny).method.semantic
    assert sem.train_source is None and sem.train_from == "x0_hat" and sem.vlb_weighting == "per_t"
    assert trial(tiny, **{"method.semantic.inference": "x_t"}).method.semantic.train_from == "x_t"
    assert trial(tiny, **{"method.semantic.train_source": "x0"}).method.semantic.train_from == "x0"


def test_a_joint_variant_may_switch_semantic_on_beside_a_separate_arm(tiny):
    """The check is per arm: separate refuses it, a genrep variant in the same sweep does not."""
    cfg = from_dict(tiny(strategies=["sum", "separate"], variants={"sem": {
        "strategy": "genrep", "overrides": {"method.semantic.enabled": True, "train.stage1_steps": 1}}}))
    sem = cfg.arm("sem", 0)
    assert sem.method.semantic.enabled and sem.train.stage1_steps == 1
    assert not cfg.arm("separate", 0).method.semantic.on


# ---------------------------------------------------------------- the schedule
def test_stage_one_trains_perception_alone_then_the_semantic_network_follows(tiny, group):
    cfg = trial(tiny, **SEMANTIC)
    step_fn = build(cfg)
    net, m = step_fn.net, cfg.method.semantic.ema_decay
    model = net.model
    # the semantic module is shared: after the backbone in the strategy's parameters
    assert step_fn.shared[-len(list(model.semantic.parameters())):] == list(model.semantic.parameters())
    generation_only = [model.backbone.unet.conv_out.weight, *model.semantic.parameters()]
    before = [p.detach().clone() for p in generation_only]
    head = flat(model.head)
    stage1 = run(step_fn, 0, 2)
    for metrics in stage1:  # L_perc alone: no teacher, no generation loss
        assert metrics["stage"] == 1 and metrics["mc_evals"] == 0
        assert not {"loss_gen", "loss_kd", "loss_vlb", "cos"} & set(metrics)
    assert all(torch.equal(a, p) for a, p in zip(before, generation_only))  # untouched by L_perc
    assert not torch.equal(head, flat(model.head))
    assert torch.equal(flat(net.sem), flat(model))  # the switch: θ_sem = θ
    assert step_fn.semantic_eval(1) is None and step_fn.semantic_eval(2) == (net.sem, "x0_hat")

    sem_before = flat(net.sem)
    (metrics,) = run(step_fn, 2, 3)
    assert metrics["stage"] == 2 and metrics["mc_evals"] > 0  # the teacher is back
    assert {"loss_gen", "loss_vlb", "loss_rep", "sigma_factor", "cos"} <= set(metrics)
    assert metrics["loss_rep"] > 0 and metrics["sigma_factor"] == pytest.approx(1.0, abs=0.05)
    expected = torch.lerp(sem_before, flat(model), 1 - m)  # θ_sem ← m·θ_sem + (1−m)·θ
    assert torch.allclose(flat(net.sem), expected, rtol=0, atol=1e-7)
    assert not torch.equal(flat(net.sem), flat(model))
    assert not torch.equal(before[0], model.backbone.unet.conv_out.weight)


def test_without_stage_one_the_semantic_network_starts_at_step_zero(tiny, group):
    cfg = trial(tiny, "sum", **{**SEMANTIC, "train.stage1_steps": 0, "method.beta_kd": 0.0})
    step_fn = build(cfg)
    init = flat(step_fn.net.model)
    assert torch.equal(flat(step_fn.net.sem), init)
    (metrics,) = run(step_fn, 0, 1)
    assert metrics["stage"] == 2
    m = cfg.method.semantic.ema_decay
    assert torch.allclose(flat(step_fn.net.sem), torch.lerp(init, flat(step_fn.net.model), 1 - m),
                          rtol=0, atol=1e-7)


def test_rep_align_alone_trains_with_the_unmodulated_eps(tiny, group):
    """rep_align > 0 with enabled false: L_rep is on, Δε and the variance factor are not (their
    parameters take no gradient), and evaluation samples with the base ε."""
    cfg = trial(tiny, "sum", **{"method.semantic.rep_align": 0.5, "method.beta_kd": 0.0})
    step_fn = build(cfg)
    sem = step_fn.net.model.semantic
    modulation = [p for n, p in sem.named_parameters() if not n.startswith("projector.")]
    mean_sigma = [p.detach().clone() for p in modulation]
    (metrics,) = run(step_fn, 0, 1)
    assert metrics["loss_rep"] > 0 and metrics["loss_vlb"] == 0 and metrics["sigma_factor"] == 1
    assert all(torch.equal(a, p) for a, p in zip(mean_sigma, modulation))
    assert step_fn.semantic_eval(None) is None


def test_stage_one_without_semantic_has_no_semantic_network(tiny, group):
    cfg = trial(tiny, "sum", **{"train.stage1_steps": 1, "method.beta_kd": 0.0})
    step_fn = build(cfg)
    assert step_fn.net.sem is None and step_fn.net.model.semantic is None
    first, second = run(step_fn, 0, 2)
    assert first["stage"] == 1 and "loss_gen" not in first
    assert second["stage"] == 2 and "loss_gen" in second and "loss_vlb" not in second


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("stop", [1, 3], ids=["in-stage-1", "after-the-switch"])
def test_resume_in_either_stage_is_bitwise_exact(tiny, group, tmp_path, stop):
    """Checkpoint after ``stop`` steps (stage 1 ends after 2), rebuild, load, go on to 5 steps:
    the metrics, the weights and the semantic copy equal an uninterrupted run's, bitwise."""
    cfg = trial(tiny, **SEMANTIC)
    straight_fn = build(cfg)
    straight = run(straight_fn, 0, 5)
    step_fn = build(cfg)
    head = run(step_fn, 0, stop)
    save_checkpoint(tmp_path, step_fn.networks(), {"step": stop, **step_fn.state_dict()})
    step_fn = build(cfg)
    state = load_checkpoint(tmp_path, step_fn.networks())
    step_fn.load_state_dict(state)
    assert head + run(step_fn, state["step"], 5) == straight
    assert torch.equal(flat(step_fn.net.model), flat(straight_fn.net.model))
    assert torch.equal(flat(step_fn.net.sem), flat(straight_fn.net.sem))


# ---------------------------------------------------------------- evaluation
def test_heldout_loss_of_the_modulated_eps_reads_x_sem_as_the_sampler(tiny, group):
    """The held-out ε is ε_θ + Δε with x_sem read off each row's own x̂_0 (or x_t), as sampling
    reads it (genrep.semantic.semantic_eps_fn): chunking does not change it, and it is not the
    base ε's."""
    from genrep.metrics import heldout_denoising_errors
    from genrep.semantic import semantic_eps_fn
    from harness.evaluate import heldout_metrics

    cfg = trial(tiny, "sum", **{"method.semantic.enabled": True})
    step_fn = build(cfg)
    model, sem_net = step_fn.net.model, step_fn.net.sem
    with torch.no_grad():
        model.semantic.mean_out.weight.normal_(generator=torch.Generator().manual_seed(0))
    x, y = batch(7)
    acs = step_fn.alphas_cumprod
    fn = semantic_eps_fn(model, sem_net, "x0_hat", acs)
    chunked = heldout_denoising_errors(fn, x, y, acs, batch_size=3)
    whole = heldout_denoising_errors(fn, x, y, acs)
    base = heldout_denoising_errors(lambda xt, t, c: model.eps(xt, t, c), x, y, acs)
    assert torch.allclose(chunked, whole, atol=1e-5) and not torch.allclose(whole, base, atol=1e-3)
    held, _ = heldout_metrics(model, x, y, acs, (sem_net, "x0_hat"))
    assert held["heldout_loss"] == pytest.approx(whole.mean().item(), rel=1e-5)


def test_evaluation_samples_and_scores_with_the_semantic_network(tiny, group):
    """evaluate(semantic=(sem net, source)): the samples take Δε from each step's x_sem and the
    held-out loss the modulated ε; the zero-shot accuracy keeps the base ε (the same value)."""
    from genrep.reference import ReferenceNet
    from harness.evaluate import evaluate

    cfg = trial(tiny, "sum", **{"method.semantic.enabled": True, "method.beta_kd": 0.0})
    step_fn = build(cfg)
    model = step_fn.net.model
    with torch.no_grad():
        model.semantic.mean_out.weight.normal_(generator=torch.Generator().manual_seed(0))
    ref = ReferenceNet(1, 10, width=4)
    x, y = batch(8, n=10)
    kw = dict(mc_k=1, mc_images=4, sample_per_class=1, ddim_steps=2, alphas_cumprod=step_fn.alphas_cumprod)
    base = evaluate(model, model, x, y, ref, **kw)
    out = {s: evaluate(model, model, x, y, ref, semantic=step_fn.semantic_eval(None)[:1] + (s,), **kw)
           for s in ("x0_hat", "x_t")}
    for got in out.values():
        assert got["mc_acc"] == base["mc_acc"] and got["head_acc"] == base["head_acc"]
        assert got["heldout_loss"] != base["heldout_loss"] and got["fd_ref"] != base["fd_ref"]
    assert out["x0_hat"]["fd_ref"] != out["x_t"]["fd_ref"]  # the source of x_sem matters


def test_the_stochastic_sampler_reports_beside_ddim_and_sees_the_factor(tiny, group):
    """eval.samplers [ddim, ddpm]: ddim's metrics keep their names and values, ddpm's (η = 1)
    come as fd_ref_ddpm, kid_ref_ddpm, sample_acc_ddpm from the same x_T. A σ factor ≠ 1 (f_σ
    perturbed, Δε still 0) moves the ddpm samples and leaves the ddim ones bitwise."""
    from genrep.reference import ReferenceNet
    from harness.evaluate import evaluate

    cfg = trial(tiny, "sum", **{"method.semantic.enabled": True, "method.beta_kd": 0.0,
                                "eval.samplers": ("ddim", "ddpm")})
    step_fn = build(cfg)
    model = step_fn.net.model
    ref = ReferenceNet(1, 10, width=4)
    x, y = batch(8, n=10)
    kw = dict(mc_k=1, mc_images=2, sample_per_class=1, ddim_steps=2, ddpm_steps=4,
              alphas_cumprod=step_fn.alphas_cumprod, semantic=step_fn.semantic_eval(None))
    ddim_only = evaluate(model, model, x, y, ref, **kw)
    both = evaluate(model, model, x, y, ref, samplers=cfg.eval.samplers, **kw)
    names = ("fd_ref", "kid_ref", "sample_acc")
    assert all(both[m] == ddim_only[m] for m in names)
    assert all(f"{m}_ddpm" in both and f"{m}_ddpm_stderr" in both for m in names)
    assert both["fd_ref_ddpm"] != both["fd_ref"]
    with torch.no_grad():
        for p in model.semantic.sigma.parameters():
            p.normal_(generator=torch.Generator().manual_seed(1))
    moved = evaluate(model, model, x, y, ref, samplers=cfg.eval.samplers, **kw)
    assert all(moved[m] == both[m] for m in names)
    assert moved["fd_ref_ddpm"] != both["fd_ref_ddpm"]
