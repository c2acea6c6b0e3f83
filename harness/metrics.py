"""The one metric registry: each metric's name, direction (↑/↓), unit and kind.

Results (``higher_is_better`` column), reports (↑/↓ labels, best-in-column, which columns and how
a trial's rows reduce), the Optuna search (objectives and their default direction) and ``perf``
all read this table; a metric is added here once, and a name registered twice is an error.
``kind`` groups metrics: perception, robustness (perception on noised inputs), generation,
teacher, loss, cost, conflict (telemetry of the task gradients, no direction), data, status.

A reported row may carry ``"<metric>_stderr"`` beside ``"<metric>"``: the results table moves it
to that metric's ``stderr`` column (``harness.results.long_rows``); it is never a metric itself.
"""
from __future__ import annotations

import re
from typing import NamedTuple

STDERR_SUFFIX = "_stderr"
PER_T = re.compile(r"(?P<base>.+)_t\d+")  # heldout_loss_t50: heldout_loss at one timestep
ROBUST = re.compile(r"head_acc_t(?P<t>\d+)")  # head top-1 on inputs noised to t (eval.robust_t)


class Metric(NamedTuple):
    name: str
    higher_is_better: bool | None  # None: no direction (telemetry such as cos)
    unit: str = ""
    kind: str = ""
    objective: bool = False  # may be an Optuna objective (read off a trial's final report)
    reduce: str = ""  # a per-step cost: how the report reduces a trial's train rows ("mean", "max", "last")


def _m(name, hib, unit="", kind="", objective=False, reduce="") -> Metric:
    return Metric(name, hib, unit, kind, objective, reduce)


def _registry(*metrics: Metric) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for m in metrics:
        if m.name in out:
            raise ValueError(f"metric {m.name!r} registered twice")
        out[m.name] = m
    return out


METRICS: dict[str, Metric] = _registry(
    # perception (held out; head_acc, mc_acc with a binomial stderr)
    _m("head_acc", True, "fraction", "perception", objective=True),
    # dense perception (method.perception.tasks: segment): from one confusion matrix summed over
    # the held-out images, background included (genrep.dense); bootstrap stderr over images
    _m("miou", True, "fraction", "perception", objective=True),
    _m("pixel_acc", True, "fraction", "perception"),
    _m("mc_acc", True, "fraction", "perception", objective=True),
    _m("head_ece", False, "fraction", "perception", objective=True),
    # robustness (eval.robust_t; harness.evaluate.robust_metrics): head top-1 on x_t ~ q(x_t|x),
    # binomial stderr, secondary (no objective); noise_sigma_t<t> = √(1−ᾱ_t), the input noise it
    # was scored at. Another t resolves by ``lookup`` to head_acc's direction
    _m("head_acc_t50", True, "fraction", "robustness"),
    _m("head_acc_t150", True, "fraction", "robustness"),
    _m("head_acc_t300", True, "fraction", "robustness"),
    _m("noise_sigma", None, "√(1−ᾱ_t)", "robustness"),
    # generation (held out; heldout_loss (and heldout_loss_t<t> per timestep, see ``lookup``):
    # stderr over images; fd_ref: bootstrap stderr; sample_acc: binomial)
    _m("heldout_loss", False, "mse", "generation", objective=True),
    _m("fd_ref", False, "feature units²", "generation", objective=True),
    # kernel distance (KID's unbiased MMD², cubic kernel) in the same features: unbiased at small n;
    # jackknife stderr
    _m("kid_ref", False, "kernel units", "generation", objective=True),
    _m("guidance_scale", None, "", "generation"),  # the CFG scale the samples used (chosen when "auto")
    _m("sample_acc", True, "fraction", "generation", objective=True),
    # the same three of the stochastic sampler (eval.samplers: ddpm: η = 1, eval.ddpm_steps), where
    # the semantic σ factor acts; the plain names are the η = 0 DDIM sampler's
    _m("fd_ref_ddpm", False, "feature units²", "generation", objective=True),
    _m("kid_ref_ddpm", False, "kernel units", "generation", objective=True),
    _m("sample_acc_ddpm", True, "fraction", "generation", objective=True),
    _m("ref_val_acc", True, "fraction", "generation"),  # the reference classifier's own
    # training rows: window means over the logged steps
    _m("acc", True, "fraction", "perception"),
    _m("kd_agree", True, "fraction", "teacher"),
    _m("mc_stderr", False, "", "teacher"),  # the teacher's own Monte Carlo error, a metric here
    _m("loss_perc", False, "nats", "loss"),
    _m("loss_gen", False, "mse", "loss"),
    _m("loss_ce", False, "nats", "loss"),
    _m("loss_kd", False, "nats", "loss"),
    _m("loss_cls", False, "nats", "loss"),  # w_cls's term when there are several perception tasks
    _m("loss_seg", False, "nats", "loss"),  # L_seg = per-pixel CE + λ_dice·Dice
    _m("loss_seg_ce", False, "nats", "loss"),
    _m("loss_dice", False, "", "loss"),
    _m("seg_acc", True, "fraction", "perception"),  # the training batch's pixel accuracy
    # semantic-driven generation (method.semantic): the variational-bound term that trains the
    # variance factor, the representation-alignment term, the mean variance factor σ_f, and the
    # training stage (1: perception only, 2: joint; train.stage1_steps)
    _m("loss_vlb", False, "nats", "loss"),
    _m("loss_rep", False, "", "loss"),
    _m("sigma_factor", None, "", "loss"),
    _m("stage", None, "", "loss"),
    # cost: per training step (reduced per trial in reports), then per evaluation
    _m("step_time", False, "s", "cost", objective=True, reduce="mean"),
    # the run's training images over its training seconds, so far (cumulative: the last row is
    # the whole run's; a mean of per-step rates B/dt weighs fast steps more)
    _m("images_per_s", True, "images/s", "cost", reduce="last"),
    _m("mc_evals", False, "forwards/step", "cost", objective=True, reduce="mean"),  # the teacher's
    _m("rss_mb", False, "MiB", "cost", reduce="max"),
    _m("eval_seconds", False, "s", "cost"),
    # a trial's wall split (the final row): start-up (networks, engines, teacher inputs, loader,
    # checkpoint restore; the last attempt's) and training (the run's steps, every attempt's);
    # the final evaluation is its eval_seconds
    _m("startup_s", False, "s", "cost"),
    _m("train_s", False, "s", "cost"),
    _m("eval_network_evals", False, "forwards", "cost"),
    _m("mc_evals_per_image", False, "forwards/image", "cost"),
    _m("params_total", None, "parameters", "cost"),
    _m("num_networks", None, "networks", "cost"),
    # gradient telemetry (harness.step): no better or worse, what the strategies saw and did
    _m("cos", None, "", "conflict"),
    _m("norm_p", None, "", "conflict"),
    _m("norm_g", None, "", "conflict"),
    _m("norm_ratio", None, "", "conflict"),
    _m("conflict", None, "fraction of steps", "conflict"),
    _m("damping", None, "", "conflict"),
    _m("w_p", None, "", "conflict"),
    _m("w_g", None, "", "conflict"),
    _m("update_change", None, "‖u − u_ref‖/‖u_ref‖", "conflict"),  # does the strategy act at all?
    _m("seg_cos_p10", None, "", "conflict"),  # per-tensor cos quantiles (every task-gradient arm)
    _m("seg_cos_median", None, "", "conflict"),
    _m("seg_cos_p90", None, "", "conflict"),
    _m("seg_conflict", None, "fraction of tensors", "conflict"),
    _m("seg_shared", None, "fraction of tensors", "conflict"),
    _m("seg_norm_ratio_median", None, "‖g_p‖/‖g_g‖", "conflict"),  # over the tensors both reach
    # strategy.scope: attention (genrep/strategies/scope.py): the aligned tensors' own values
    _m("scope_cos", None, "", "conflict"),
    _m("scope_update_change", None, "‖u − u_ref‖/‖u_ref‖", "conflict"),  # within the scope
    _m("scope_tensors", None, "fraction of tensors", "conflict"),
    _m("scope_params", None, "fraction of parameters", "conflict"),
    # the Monte Carlo teacher's own quality on held-out images (its top-1 is mc_acc)
    _m("teacher_nll", False, "nats", "teacher"),
    _m("teacher_ece", False, "fraction", "teacher"),
    _m("teacher_max_prob", None, "probability", "teacher"),
    _m("teacher_entropy", None, "nats", "teacher"),  # log C = a uniform teacher
    _m("teacher_tau", None, "", "teacher"),  # τ_mc in use (fitted when mc.tau: auto)
    # data and status
    _m("skipped_samples", False, "samples", "data"),
    _m("labelled", None, "fraction of the batch", "data"),  # rows with a label (data.labelled_fraction)
    _m("failed", False, "", "status"),  # the status row of a failed trial (harness.sweep)
)


def lookup(name: str) -> Metric | None:
    """The registered metric, or for ``<base>_t<t>`` (one timestep of ``<base>``, e.g.
    ``heldout_loss_t50``) the base metric under that name, not an objective; else None."""
    if name in METRICS:
        return METRICS[name]
    per_t = PER_T.fullmatch(name)
    base = METRICS.get(per_t["base"]) if per_t else None
    return base._replace(name=name, objective=False) if base else None


def direction(name: str) -> bool | None:
    """True if higher is better, False if lower is, None for an unregistered or neutral metric."""
    m = lookup(name)
    return None if m is None else m.higher_is_better


def objectives() -> dict[str, str]:
    """Metrics Optuna may optimise, with their default mode ("max"/"min")."""
    return {n: "max" if m.higher_is_better else "min" for n, m in METRICS.items() if m.objective}


def held_out() -> tuple[str, ...]:
    """The quality metrics a report shows per strategy: held-out objectives, registry order."""
    return tuple(n for n, m in METRICS.items() if m.objective and m.kind in ("perception", "generation"))


def robustness(names) -> list[str]:
    """The robustness metrics among ``names`` (``head_acc_t<t>``), by t."""
    found = [(int(m["t"]), n) for n in set(names) if (m := ROBUST.fullmatch(n))]
    return [n for _, n in sorted(found)]


def costs() -> dict[str, str]:
    """Per-step cost metrics → how a report reduces one trial's logged train rows."""
    return {n: m.reduce for n, m in METRICS.items() if m.reduce}


def stderr_of(key: str) -> str | None:
    """The metric whose stderr ``key`` is (``head_acc_stderr`` → ``head_acc``), else None."""
    base = key[:-len(STDERR_SUFFIX)] if key.endswith(STDERR_SUFFIX) else None
    return base or None
