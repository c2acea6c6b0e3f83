"""One training step on one data-parallel rank: losses, task gradients, the strategy, the update.

The maths is genrep's (draws, losses, strategies, telemetry); everything that involves other ranks
or the DeepSpeed engine goes through ``harness.parallel``. Training modes are registered by name
(``harness.modes`` knows which arm runs in which); the loop never names a strategy:
- ``joint``: one GenRep network; the strategy combines the perception and generation gradients of
  the shared parameters (on the *global*, all-reduced gradients), the head takes the perception
  gradient untouched. A strategy that needs no task gradients (``sum``) is a single backward of
  the task-weighted loss.
- ``separate``: two networks of the same architecture, one per task, each with its own engine.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from genrep import strategies
from genrep.diffusion import draw_denoising, make_scheduler
from genrep.dense import segmentation_loss
from genrep.losses import generation_loss, multitask_perception_loss, perception_loss
from genrep.model import GenRepModel, build_model
from genrep.pretrained import load_backbone
from genrep.semantic import semantic_generation_loss
from genrep.registry import Registry
from genrep.strategies.telemetry import scope_summary, summarize
from harness import engine as ds
from harness import parallel
from harness.config import TrialConfig
from harness.modes import check_options, mode_of
from harness.parallel import Shard, step_generator  # noqa: F401  (re-exported for callers)
from harness.teacher import Teacher


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or ±inf: the trial stops; the message names the step and the loss."""


def check_finite(step: int, **losses: torch.Tensor) -> None:
    """Raise :class:`NonFiniteLoss` before any gradient of a non-finite loss reaches the weights.

    The verdict is global (``parallel.nonfinite_anywhere``): a NaN on one rank's slice stops every
    rank at the same step, instead of leaving the others waiting in the next collective.
    """
    bad = parallel.nonfinite_anywhere(losses)
    if bad:
        here = ", ".join(f"{n} = {float(losses[n]):g}" for n in bad)
        raise NonFiniteLoss(f"step {step}: non-finite {' and '.join(bad)} (on this rank: {here}); "
                            "the trial stops before the update")


class Network:
    """One GenRep network with its DeepSpeed engine and (optionally) an EMA teacher copy and a
    semantic network."""

    def __init__(self, cfg: TrialConfig, world: int, seed: int, device: torch.device,
                 init_dir: str | None = None):
        model = build_model(cfg.model_config(), seed=seed)  # the heads: this seed's, always
        if init_dir is not None:  # the warm start's backbone (harness.warmstart), before the engine
            load_backbone(model, init_dir)  # copies the weights into its ZeRO partitions
        self.model: GenRepModel = model.to(device)
        self.engine = ds.make_engine(self.model, cfg, world)
        # the EMA copy serves only as the teacher: none without one (β = 0), no copy to update
        mc = cfg.method.mc  # method.mc.source: self distils the EMA head's own predictions
        ema = (mc.teacher == "ema" or mc.source == "self") and cfg.method.beta_kd > 0
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if ema else None
        self.decay = cfg.method.ema_decay
        # the semantic network (method.semantic on): an EMA copy of this network, read only through
        # semantic_map under no_grad; a copy of the step-0 network here, copied again at the
        # end of stage 1 (start_semantic), so it is the network as stage 2 begins either way
        sem = cfg.method.semantic
        self.sem = copy.deepcopy(self.model).requires_grad_(False) if sem.on else None
        self.sem_decay = sem.ema_decay

    @torch.no_grad()
    def update_ema(self) -> None:
        """θ_ema ← d·θ_ema + (1−d)·θ (one fused call over all tensors)."""
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.model.parameters()],
                                 1 - self.decay)

    @torch.no_grad()
    def start_semantic(self) -> None:
        """θ_sem ← θ: the semantic network starts stage 2 as the unified network."""
        self.sem.load_state_dict(self.model.state_dict())

    @torch.no_grad()
    def update_semantic(self) -> None:
        """θ_sem ← m·θ_sem + (1−m)·θ after every stage-2 optimizer step (one fused call), m =
        method.semantic.ema_decay: the mean-teacher EMA (Tarvainen & Valpola 2017)."""
        if self.sem is not None:
            torch._foreach_lerp_(list(self.sem.parameters()), [p.detach() for p in self.model.parameters()],
                                 1 - self.sem_decay)

    @torch.no_grad()
    def semantic_map(self, x: torch.Tensor) -> torch.Tensor:
        """x_sem [B, F, h, w]: the semantic network's perception feature map of x (at t_p, ∅), no
        gradient; the generation loss decides what x is (method.semantic.train_source)."""
        return self.sem.semantic_map(x)

    def teacher(self) -> GenRepModel:
        return self.ema if self.ema is not None else self.model


class Step:
    """Shared machinery of both modes: draws, the teacher, losses (genrep's, on this rank's rows).

    ``calibration`` and ``prior`` are the teacher's inputs (harness.teacher.teacher_inputs reads
    them from the dataset); the strategy's options are resolved once, here, not on every step.
    """

    def __init__(self, cfg: TrialConfig, shard: Shard, device: torch.device,
                 calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
                 prior: torch.Tensor | None = None, init_dir: str | None = None):
        self.cfg, self.shard, self.device = cfg, shard, device
        self.init_dir = init_dir  # where every network's backbone starts (None: from scratch)
        self.alphas_cumprod = make_scheduler().alphas_cumprod.to(device)
        self.num_classes = cfg.model_config().num_classes
        self.teacher = Teacher(cfg, shard, device, self.alphas_cumprod, self.num_classes,
                               calibration=calibration, prior=prior)
        self.options = check_options(cfg.strategy.name, cfg.strategy.options)  # defaults filled in
        self.task_weights: tuple[float, float] = self.options["task_weights"]

    def state_dict(self) -> dict[str, Any]:
        """The step's own running state, for checkpoints (a resumed run must refit nothing)."""
        return {"strategy_state": getattr(self, "state", None), **self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self, "state"):
            self.state = state["strategy_state"]
        self.teacher.load_state_dict(state)

    def semantic_eval(self, step: int | None):
        """(semantic network, x_sem source) for evaluation with semantic-driven generation, or None."""
        return None

    def generation_loss(self, model: GenRepModel, x, y, step: int, semantic=None):
        """genrep's L_gen on this rank's rows of draws made for the global batch; given the
        semantic network's map reader ``semantic`` (Network.semantic_map), genrep.semantic's loss
        instead: L_gen of the modulated ε (``method.semantic.enabled``) + vlb_weight·L_vlb +
        rep_align·L_rep, x_sem read off ``train_from`` (x̂_0, x_t or x_0)."""
        g = step_generator(self.cfg.seed, step, "denoise")
        draws = draw_denoising(self.shard.global_batch, tuple(x.shape[1:]), len(self.alphas_cumprod),
                               self.cfg.method.p_uncond, g).rows(self.shard.rows, self.device)
        if semantic is None:
            return generation_loss(model.eps, x, y, draws, self.alphas_cumprod, model.null_class)
        sem = self.cfg.method.semantic
        return semantic_generation_loss(model, x, y, draws, self.alphas_cumprod, model.null_class, semantic,
                                        source=sem.train_from, vlb_weight=sem.vlb_weight,
                                        rep_weight=sem.rep_align, modulate=sem.enabled,
                                        vlb_weighting=sem.vlb_weighting)

    def perception_loss(self, model: GenRepModel, x, y, q, masks=None):
        """genrep's L_perc = Σ_k w_k·L_k over ``method.perception.tasks``: classify, L_ce + β·τ²·(1/B)
        Σ_{i scored} KL_i on the head's logits (q has 0 rows on a step without teacher: the term is
        then 0); segment, L_seg on the seg head's logits against ``masks``. One backbone pass
        (``model.perceive``) feeds both heads."""
        m, p = self.cfg.method, self.cfg.method.perception
        if "segment" in p.tasks and masks is None:
            raise ValueError("method.perception.tasks has segment: the step needs the batch's masks")
        out = model.perceive(x) if "segment" in p.tasks else {"logits": model.logits(x)}
        terms = {}
        if "classify" in p.tasks:
            terms["classify"] = perception_loss(out["logits"], y, q, beta=m.beta_kd, tau=m.tau_kd,
                                                use_ce=m.use_ce, label_smoothing=m.label_smoothing)
        if "segment" in p.tasks:
            terms["segment"] = segmentation_loss(out["seg_logits"], masks, p.dice_weight)
        return multitask_perception_loss(terms, {"classify": p.weights.classify,
                                                 "segment": p.weights.segment})


MODES: Registry[type] = Registry("training mode")


@MODES.register("joint")
class JointStep(Step):
    def __init__(self, cfg: TrialConfig, shard: Shard, device: torch.device, **teacher):
        super().__init__(cfg, shard, device, **teacher)
        self.net = Network(cfg, shard.world, cfg.seed, device, self.init_dir)
        self.strategy = strategies.get(cfg.strategy.name)
        model = self.net.model
        self.shared, self.head = model.shared_parameters(), model.head_parameters()
        # per-tensor segment ids whatever the granularity: the telemetry is per tensor on every arm
        # that takes task gradients; the strategy's own segments are these or the whole vector
        self.tensors = strategies.segment_ids([p.numel() for p in self.shared]).to(device)
        self.segments = self.tensors if cfg.strategy.granularity == "tensor" else None
        # strategy.scope: attention: the rule acts on the attention tensors (together, or each at
        # tensor granularity), the rest take the task-weighted sum; None: every shared tensor
        attention = model.attention_mask()
        self.scope = (strategies.Scope.of(attention, cfg.strategy.granularity, device)
                      if cfg.strategy.scope == "attention" else None)
        self.scope_params = (sum(p.numel() for p, a in zip(self.shared, attention) if a)
                             / sum(p.numel() for p in self.shared))  # share of D in scope
        self.state = None  # a stateful rule's running state (gradvac)
        self.buffer: torch.Tensor | None = None  # [2, D] task gradients, reused every step

    def networks(self) -> dict[str, Network]:
        return {"joint": self.net}

    def task_grads(self, g_p, g_g) -> torch.Tensor:
        """[g_p; g_g] flattened into one [2, D] buffer kept across steps.

        A fresh D-sized tensor costs as much CPU in first-touch page faults as in the copy itself
        (glibc hands large blocks back to the OS on free): with a fresh stack per step and a
        fresh combined vector, genrep cost 1.10x sum at batch 32 on digits16, with the buffer
        and the in-place combination 1.05x (docs/performance.md, P2).
        """
        if self.buffer is None:
            d = sum(p.numel() for p in self.shared)
            self.buffer = torch.empty(2, d, dtype=self.shared[0].dtype, device=self.device)
        parallel.flat(g_p, self.shared, out=self.buffer[0])
        parallel.flat(g_g, self.shared, out=self.buffer[1])
        return self.buffer

    def __call__(self, x, y, step: int, masks=None) -> dict[str, Any]:
        """Stage 1 (step < train.stage1_steps): perception alone; stage 2: the joint step."""
        if step < self.cfg.train.stage1_steps:
            return self.perception_step(x, y, step, masks)
        model, engine = self.net.model, self.net.engine
        q, mq = self.teacher.probs(self.net.teacher(), x, step)
        loss_p, mp = self.perception_loss(model, x, y, q, masks)
        semantic = self.net.semantic_map if self.net.sem is not None else None
        loss_g, mg = self.generation_loss(model, x, y, step, semantic)
        check_finite(step, loss_perc=loss_p, loss_gen=loss_g)
        if self.strategy.needs_task_grads:
            tel = self.aligned_backward(loss_p, loss_g)
        else:
            w_p, w_g = self.task_weights
            parallel.backward(engine, w_p * loss_p + w_g * loss_g)
            tel = {}
        parallel.optimizer_step(engine)
        self.net.update_ema()
        self.net.update_semantic()
        return {**mq, **mp, **mg, **tel, **self.stage_metric(2)}

    def perception_step(self, x, y, step: int, masks=None) -> dict[str, Any]:
        """Stage 1: L_perc alone, one engine backward, no strategy (there is one task). No teacher:
        the denoiser it would read is the one stage 1 leaves untrained, so its posterior is noise;
        L_perc is not task-weighted (nothing to weigh it against). The last stage-1 step copies
        the network into the semantic network (Network.start_semantic)."""
        q = x.new_zeros(0, self.num_classes)  # no teacher rows: the distillation term is 0
        loss_p, mp = self.perception_loss(self.net.model, x, y, q, masks)
        check_finite(step, loss_perc=loss_p)
        parallel.backward(self.net.engine, loss_p)
        parallel.optimizer_step(self.net.engine)
        self.net.update_ema()
        if step + 1 == self.cfg.train.stage1_steps and self.net.sem is not None:
            self.net.start_semantic()
        return {**mp, "mc_evals": 0.0, **self.stage_metric(1)}

    def stage_metric(self, stage: int) -> dict[str, float]:
        """``stage`` (1 or 2) for trials with a stage 1 or the semantic network, else nothing."""
        on = self.cfg.train.stage1_steps > 0 or self.cfg.method.semantic.on
        return {"stage": float(stage)} if on else {}

    def semantic_eval(self, step: int | None):
        """What evaluation needs for semantic-driven generation: (semantic network, x_sem source
        while sampling) once stage 2 has begun with ``method.semantic.enabled``, else None (stage
        1: the semantic network is not made yet; rep_align alone changes only training)."""
        sem = self.cfg.method.semantic
        if not sem.enabled or (step is not None and step < self.cfg.train.stage1_steps):
            return None
        return self.net.sem, sem.inference

    def weights(self, whole: torch.Tensor, per_tensor: torch.Tensor):
        """(w [T, 2] per shared tensor, the rule's telemetry): the rule on the whole vector's Gram
        (granularity vector), on each tensor's (tensor), or on the scope's segments with the
        task-weighted sum outside them (strategy.scope: attention)."""
        if self.scope is not None:
            return strategies.scope.scoped_weights(self.strategy, per_tensor, self.scope, self.state,
                                                   self.options)
        gram = per_tensor if self.segments is not None else whole
        w, tel = self.strategy.resolved_weights(gram, self.state, self.options)
        return w.reshape(-1, 2).expand(per_tensor.shape[0], 2), tel

    def aligned_backward(self, loss_p, loss_g) -> dict[str, float]:
        """Task gradients → global Gram matrix → strategy weights → combined gradient.

        Every rule is per-segment weights w from the Gram matrix of the *global* (averaged) task
        gradients, so each rank combines its *local* gradients with the global weights,
        c_r = w_p·g_p,r + w_g·g_g,r, and the engine's own averaging of c_r gives exactly
        w_p·ḡ_p + w_g·ḡ_g. Only the Gram matrix needs the global gradients.
        """
        params, n = self.shared + self.head, len(self.shared)
        g_p = torch.autograd.grad(loss_p, params, allow_unused=True)
        g_g = torch.autograd.grad(loss_g, self.shared, allow_unused=True)
        local = self.task_grads(g_p[:n], g_g)
        whole, per_tensor = parallel.global_grams(local, self.tensors)  # float64 [1|T, 2, 2]
        w, tel = self.weights(whole, per_tensor)
        self.state = tel.pop("state", self.state)
        task_weights = self.task_weights
        # per-tensor telemetry for every granularity and scope: w is per tensor, so update_change
        # over the per-tensor Grams is the whole update's (Σ_s G_s = G)
        summary = summarize(per_tensor, w, tel, task_weights)
        if self.scope is not None:
            summary |= {**scope_summary(per_tensor, w, self.scope.mask, task_weights),
                        "scope_params": self.scope_params}
        # one weight pair for the whole vector: one in-place pass, else one per tensor block
        whole_vector = self.segments is None and self.scope is None
        combined = strategies.apply_weights(local, w[:1] if whole_vector else w,
                                            None if whole_vector else self.tensors, in_place=True)
        # the heads (classification, and segmentation when on: model.head_parameters) take their
        # own task's gradient, unaligned but task-weighted as in sum's w_p·L_p
        head = [task_weights[0] * g if g is not None else torch.zeros_like(p)
                for g, p in zip(g_p[n:], self.head)]
        parallel.backward_combined(self.net.engine, params, parallel.unflat(combined, self.shared) + head)
        return summary


@MODES.register("separate")
class SeparateStep(Step):
    """Two networks: perception-only and generation-only; the teacher is the generation network.

    Task weights mean little here: nothing is shared, so they only scale each network's loss, and
    Adam's per-coordinate normalisation undoes a constant scale almost entirely (only ε and the
    weight decay's relative size change). They are applied all the same, for a like-for-like arm.
    """

    def __init__(self, cfg: TrialConfig, shard: Shard, device: torch.device, **teacher):
        if cfg.method.semantic.on or cfg.train.stage1_steps:  # harness.config refuses it at load time
            raise ValueError("method.semantic and train.stage1_steps need one unified network; "
                             "separate trains two that share nothing")
        super().__init__(cfg, shard, device, **teacher)
        # both from the warm start's backbone, when there is one (heads: each its own seed's)
        self.perc = Network(cfg, shard.world, cfg.seed, device, self.init_dir)
        self.gen = Network(cfg, shard.world, cfg.seed + 10_000, device, self.init_dir)

    def networks(self) -> dict[str, Network]:
        return {"perception": self.perc, "generation": self.gen}

    def __call__(self, x, y, step: int, masks=None) -> dict[str, Any]:
        # the Bayes teacher reads the generation network; the self-training control the head's EMA
        source = self.perc if self.cfg.method.mc.source == "self" else self.gen
        q, mq = self.teacher.probs(source.teacher(), x, step)
        loss_p, mp = self.perception_loss(self.perc.model, x, y, q, masks)
        loss_g, mg = self.generation_loss(self.gen.model, x, y, step)
        check_finite(step, loss_perc=loss_p, loss_gen=loss_g)
        w_p, w_g = self.task_weights
        for net, loss in ((self.perc, w_p * loss_p), (self.gen, w_g * loss_g)):
            parallel.backward(net.engine, loss)
            parallel.optimizer_step(net.engine)
        self.gen.update_ema()
        return {**mq, **mp, **mg}


def make_step(cfg: TrialConfig, shard: Shard, device: torch.device,
              calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
              prior: torch.Tensor | None = None, init_dir: str | None = None) -> Step:
    """The trial's step in its training mode, with the teacher's inputs
    (harness.teacher.teacher_inputs: calibration images for ``mc.tau: auto``, the class prior) and
    the warm start's backbone directory (harness.warmstart), if any."""
    return MODES.get(mode_of(cfg.strategy.name))(cfg, shard, device, calibration=calibration, prior=prior,
                                                 init_dir=init_dir)
