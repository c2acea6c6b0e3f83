"""The teacher of a trial: genrep's posterior estimators on this rank's rows, with the
calibration images and class prior it is built with, and its fitted temperature τ_mc.

``method.mc.source: bayes`` distils the network's own Bayes posterior p(y|x) from its denoising
errors; ``self`` is the self-training control: the EMA head's own predictions on the same rows and
schedule, so that "a Bayes teacher" and "any pseudo-labels" can be told apart.

The maths is genrep's (``genrep.posterior``, ``genrep.reverse_chain``); this module decides which
images it scores, with which draws (so W ranks draw what one rank draws on the whole batch), and
when τ is refitted. :func:`teacher_inputs` reads what it needs from the dataset once, at the start
of a trial; the step builds the teacher with it.
"""
from __future__ import annotations

from typing import Any

import torch

from genrep.model import GenRepModel
from genrep.posterior import McResult, draw_mc, fit_temperature, mc_posterior, posterior
from genrep.reverse_chain import draw_chain_noise, reverse_chain_posterior
from harness.config import TrialConfig
from harness.data import Dataset, labelled_images
from harness.data.splits import label_noise
from harness.parallel import Shard, step_generator


def teacher_inputs(cfg: TrialConfig, dataset: Dataset, device) -> dict[str, torch.Tensor | None]:
    """The teacher's calibration images (``mc.tau: auto``: the first ``calibrate_images``
    *labelled training* images in shard order, with the trial's labelled fraction: labels every arm
    trains on, so no arm sees labels the others don't; never a held-out split) and its class prior
    (``mc.prior: train``: the training split's class frequencies from the manifest)."""
    mc, d, out = cfg.method.mc, cfg.data, {"calibration": None, "prior": None}
    if mc.tau == "auto":
        x, y = labelled_images(dataset.train, mc.calibrate_images, d.labelled_fraction, d.label_seed,
                               **label_noise(cfg))  # the labels as this trial trains on them
        out["calibration"] = (x.to(device), y.to(device))
    if mc.prior == "train":
        if dataset.class_counts is None:
            raise ValueError("method.mc.prior: train needs the training split's class counts, which "
                             "only a packed dataset's manifest has (data.urls gives none)")
        out["prior"] = torch.tensor(dataset.class_counts, dtype=torch.float64, device=device)
    return out


def next_fit(last: int, mc) -> int:
    """The step at which τ is refitted after a fit at ``last``: last + min(every, max(first, last)),
    so fits land at 0, first, 2·first, 4·first, … until the gap reaches calibrate_every."""
    return last + min(mc.calibrate_every, max(mc.calibrate_first, last))


class Teacher:
    """q(c|x) from a network's own denoising errors, on the rows of this rank."""

    def __init__(self, cfg: TrialConfig, shard: Shard, device, alphas_cumprod: torch.Tensor,
                 num_classes: int, calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
                 prior: torch.Tensor | None = None):
        self.cfg, self.shard, self.device = cfg, shard, device
        self.alphas_cumprod, self.num_classes = alphas_cumprod, num_classes
        self.calibration = calibration  # labelled val images (mc.tau: auto)
        self.prior = prior  # class frequencies (mc.prior: train), else uniform
        tau = cfg.method.mc.tau
        self.tau: float | None = None if tau == "auto" else float(tau)  # τ_mc
        self.tau_step = -1  # the step τ was last fitted at ("auto")

    def state_dict(self) -> dict[str, Any]:
        """τ and when it was fitted: a resumed run must refit nothing."""
        return {"tau": self.tau, "tau_step": self.tau_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau, self.tau_step = state.get("tau", self.tau), state.get("tau_step", self.tau_step)

    def mc_options(self) -> dict[str, Any]:
        """The estimator settings shared by training, calibration and evaluation."""
        mc = self.cfg.method.mc
        return dict(chunk_size=mc.chunk_size, scale=mc.scale, weight=mc.weight, prior=self.prior)

    def tau_at(self, model: GenRepModel, step: int) -> float:
        """τ_mc in use at ``step``: the configured number, or ("auto") the temperature that
        minimises the teacher's NLL on the calibration images (temperature scaling, Guo et al.
        2017), refitted when :func:`next_fit` says (gaps doubling from calibrate_first).

        Every rank fits on the same images with the same draws, so every rank gets the same τ
        (the W-worker run stays the 1-worker run); cost: n·K·C forwards per fit."""
        mc = self.cfg.method.mc
        if mc.tau != "auto":
            return float(mc.tau)
        due = self.tau is None or (mc.calibrate_every and step >= next_fit(self.tau_step, mc))
        if due:
            fit = self.fit_self_tau(model) if mc.source == "self" else self.fit_tau(model.eps, mc.k, step)
            self.tau, self.tau_step = fit, step
        return self.tau

    @torch.no_grad()
    def fit_self_tau(self, model: GenRepModel) -> float:
        """argmin_τ NLL of softmax(z/τ) on the calibration images, z the head's own logits (the
        self-training control's temperature; no prior term: the head's logits already carry the
        training split's class frequencies)."""
        x, y = self.require_calibration()
        return fit_temperature(model.logits(x), y)

    def require_calibration(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.calibration is None:
            raise RuntimeError("method.mc.tau: auto needs calibration images (make_step(..., "
                               "calibration=...); harness.teacher.teacher_inputs reads them)")
        return self.calibration

    def fit_tau(self, eps_fn, k: int, step: int) -> float:
        """argmin_τ NLL of softmax(−e/τ + log prior) on the calibration images, e from K draws."""
        x, y = self.require_calibration()
        res = self.estimate(eps_fn, x, 1.0, step_generator(self.cfg.seed, step, "calibrate"), k=k)
        return fit_temperature(-res.errors, y, prior=self.prior)

    def estimate(self, eps_fn, x, tau: float, g: torch.Generator, rows: slice | None = None,
                 k: int | None = None, prune: bool = False) -> McResult:
        """The estimator (``mc.estimator``) on images x at temperature τ.

        Its randomness comes from ``g``: drawn for W·n images and sliced to this rank's ``rows``
        when given (so W ranks draw what one rank on the whole batch draws), else for x alone.
        ``forward``: genrep.posterior.mc_posterior with K draws (``k``, default mc.k), pruned when
        ``prune`` and mc.prune_k < K; ``reverse_chain``: genrep.reverse_chain_posterior with
        mc.chain_steps, burn_in, thin, eta, chain_start, chain, aggregate (its errors are on the
        Bayes scale by construction).
        """
        mc, shape = self.cfg.method.mc, tuple(x.shape[1:])
        total = x.shape[0] * (self.shard.world if rows is not None else 1)
        take = (lambda v: v[rows].to(self.device)) if rows is not None else (lambda v: v.to(self.device))
        if mc.estimator == "reverse_chain":
            noise = take(draw_chain_noise(mc.chain_steps, total, shape, g))
            return reverse_chain_posterior(eps_fn, x, self.num_classes, self.alphas_cumprod,
                                           steps=mc.chain_steps, burn_in=mc.burn_in, thin=mc.thin,
                                           chain=mc.chain, aggregate=mc.aggregate, tau_mc=tau,
                                           eta=mc.eta, noise=noise, start=mc.chain_start,
                                           chunk_size=mc.chunk_size, prior=self.prior)
        k = k or mc.k

        def draw(n: int):
            t, eps = draw_mc(n, total, shape, len(self.alphas_cumprod), g)
            return take(t), take(eps)

        prune = prune and mc.prune_keep is not None and mc.prune_k < k
        return mc_posterior(eps_fn, x, self.num_classes, k, self.alphas_cumprod, tau_mc=tau,
                            draw=draw, prune_k=mc.prune_k if prune else None,
                            prune_keep=mc.prune_keep if prune else None, **self.mc_options())

    def eval_estimate(self, k: int, step: int | None):
        """``estimate(eps_fn, images, generator) -> (McResult, τ)`` for a held-out evaluation of a
        zero-shot classifier: the estimator with K = ``k`` and τ fitted afresh for that network
        and K ("auto"), else the configured τ."""
        mc = self.cfg.method.mc

        def estimate(eps_fn, images, generator):
            tau = self.fit_tau(eps_fn, k, -1 if step is None else step) if mc.tau == "auto" else float(mc.tau)
            return self.estimate(eps_fn, images, tau, generator, k=k), tau
        return estimate

    def probs(self, model: GenRepModel, x, step: int):
        """q(c|x) [n, C] for the first n = ⌈subset·B⌉ images every ``mc.every`` steps, else [0, C].

        The draws (t, ε) of every round come from the global-batch generator and each rank takes
        its rows, so a W-worker run draws what a 1-worker run draws, with or without pruning.
        Pruning applies when prune_k < k (no draws are left for a second round otherwise).
        With subset < 1 each rank scores the first images of its own slice, so W workers and
        1 worker score different images: the W = 1 equivalence holds for subset = 1.
        """
        mc, m = self.cfg.method.mc, self.cfg.method
        if m.beta_kd == 0 or step % mc.every:
            return x.new_zeros(0, self.num_classes), {"mc_evals": 0.0}
        n = max(1, round(mc.subset * x.shape[0]))
        rows = slice(self.shard.rank * n, (self.shard.rank + 1) * n)
        tau = self.tau_at(model, step)
        if mc.source == "self":
            return self.self_probs(model, x[:n], tau)
        res = self.estimate(model.eps, x[:n], tau, step_generator(self.cfg.seed, step, "mc"),
                            rows=rows, prune=True)
        finite = res.stderr[torch.isfinite(res.stderr)]
        return res.probs, {"mc_evals": float(res.evals), "teacher_tau": float(tau),
                           "mc_stderr": float(finite.mean()) if finite.numel() else 0.0}

    @torch.no_grad()
    def self_probs(self, model: GenRepModel, x, tau: float):
        """The self-training control's targets q(c|x) = softmax_c(z_c/τ), z the EMA head's logits
        (genrep.posterior.posterior with −z in place of the errors e_c): pseudo-labels from the
        head itself, on the rows and schedule the Bayes teacher would score (Xie et al. 2020,
        "Self-training with Noisy Student"). Cost: n perception forwards (mc_evals)."""
        probs = posterior(-model.logits(x).float(), tau)
        return probs, {"mc_evals": float(x.shape[0]), "teacher_tau": float(tau), "mc_stderr": 0.0}
