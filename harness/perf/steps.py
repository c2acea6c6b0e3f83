"""P1-P3 and P8, every configuration timed interleaved in one process with real DeepSpeed engines,
peak memory in a fresh process each: P1 harness ``sum`` step ÷ a bare loop (same model, losses,
AdamW); P2 ``genrep`` (published rule), ``pcgrad`` ÷ ``sum``, teacher off/on; P3 the teacher ÷
none; P8 semantic-driven generation ÷ none (``sum``, no teacher)."""
from __future__ import annotations

import time
from typing import Any

import torch

from genrep.diffusion import draw_denoising, make_scheduler
from genrep.losses import generation_loss, perception_loss
from genrep.model import build_model
from harness.config import TrialConfig, trial_from_dict
from harness.engine import zero_stage
from harness.parallel import step_generator
from harness.perf.common import (SEMANTIC, TEACHERS, Row, Settings, Timed, median, peak_of, process_group,
                                 ratio_stats, spawn_ranks, synthetic_batch, time_interleaved,
                                 timing_raw, trial)


class BareLoop:
    """The reference: GenRepModel + L_ce + L_gen + AdamW in plain PyTorch, one backward of the sum,
    through the harness's genrep functions (draws, losses): the same arithmetic, without engine,
    ranks, LR schedule or metrics."""

    def __init__(self, cfg: TrialConfig):
        t = cfg.train
        self.model = build_model(cfg.model_config(), seed=cfg.seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.betas,
                                     weight_decay=t.weight_decay)
        self.alphas_cumprod = make_scheduler().alphas_cumprod
        self.p_uncond, self.seed = cfg.method.p_uncond, cfg.seed

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        draws = draw_denoising(x.shape[0], tuple(x.shape[1:]), len(self.alphas_cumprod), self.p_uncond,
                               step_generator(self.seed, step, "denoise"))
        loss_g, _ = generation_loss(self.model.eps, x, y, draws, self.alphas_cumprod, self.model.null_class)
        loss_p, _ = perception_loss(self.model.logits(x), y)
        (loss_p + loss_g).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_p.detach() + loss_g.detach()


def calibration_cost(step_fn, cfg: TrialConfig) -> dict[str, float]:
    """One τ fit (``mc.tau: auto``: calibrate_images·K·C forwards) timed apart from the steps, and
    its cost amortised over the steady-state gap calibrate_every (a short run's early fits, at
    doubling gaps from calibrate_first, cost more: harness.teacher.next_fit)."""
    mc, start = cfg.method.mc, time.perf_counter()
    if mc.tau == "auto" and mc.calibrate_every:
        step_fn.teacher.fit_tau(step_fn.net.teacher().eps, mc.k, 10**6)
        fit = time.perf_counter() - start
        return {"calibration_fit_s": fit, "calibration_per_step_s": fit / mc.calibrate_every}
    return {}


def step_configs(settings: Settings) -> dict[str, tuple[str, TrialConfig]]:
    """name -> (kind, trial config): every configuration P1-P3 time, from the sweep's trial."""
    configs = {"bare": ("bare", trial(settings, "sum", **TEACHERS["off"]))}
    for name, teacher in (("sum", "off"), ("genrep", "off"), ("pcgrad", "off"), ("sum", "kd"),
                          ("genrep", "kd"), ("pcgrad", "kd"), ("sum", "full")):
        configs[f"{name}_{teacher}"] = ("harness", trial(settings, name, **TEACHERS[teacher]))
    configs["sum_sem"] = ("harness", trial(settings, "sum", **TEACHERS["off"], **SEMANTIC))
    return configs


def build(kind: str, cfg: TrialConfig):
    from harness.step import Shard, make_step

    if kind == "bare":
        return BareLoop(cfg)
    # τ fitted on labelled images (val ones in a trial: harness.teacher.teacher_inputs); synthetic
    # ones cost the same n·K·C forwards a fit
    calibration = synthetic_batch(cfg, cfg.method.mc.calibrate_images) if cfg.method.mc.tau == "auto" else None
    return make_step(cfg, Shard(0, 1, cfg.train.batch_size), torch.device("cpu"), calibration=calibration)


def block_of(cfg: TrialConfig) -> int:
    """Steps per timed block: whole teacher periods (at least 4 steps), so a step's time includes
    the teacher's amortised cost; 1 where every step runs the teacher (the costliest)."""
    mc = cfg.method.mc
    return 1 if cfg.method.beta_kd > 0 and mc.every == 1 and mc.subset == 1.0 else max(4, mc.every)


def measure_steps(settings: Settings, configs: dict[str, tuple[str, TrialConfig]]) -> dict[str, Timed]:
    """Every configuration timed interleaved, after warm-up, in one process and one gloo group."""
    with process_group():
        timed = {name: Timed(build(kind, cfg), *synthetic_batch(cfg), block_of(cfg))
                 for name, (kind, cfg) in configs.items()}
        return time_interleaved(timed, settings.repeats, settings.warmup)


def _peak(rank: int, world: int, kind: str, trial_dict: dict, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = trial_from_dict(trial_dict)
    step_fn, (x, y) = build(kind, cfg), synthetic_batch(cfg)
    return peak_of(lambda: [step_fn(x, y, step) for step in range(steps)])


def measure_memory(configs: dict[str, tuple[str, TrialConfig]], steps: int, threads: int) -> dict[str, dict]:
    """name -> peak_of's figures for ``steps`` steps, one fresh process after another."""
    return {name: spawn_ranks(_peak, 1, kind, cfg.to_dict(), steps, threads)[0]
            for name, (kind, cfg) in configs.items()}


def step_rows(timed: dict[str, Timed], memory: dict[str, dict],
              configs: dict[str, tuple[str, TrialConfig]]) -> list[Row]:
    def row(row_id, what, a, b, op="info", target=float("nan"), note="", extra_s=0.0, **extra) -> Row:
        """(a + extra_s) ÷ b, median step times, with each side's timing and memory and the
        paired per-round ratios (of the timed steps alone)."""
        stats = ratio_stats(timed[a].wall, timed[b].wall)
        raw = {n: {**timing_raw(timed[n]), **memory.get(n, {})} for n in (a, b)}
        measured = (median(timed[a].wall) + extra_s) / median(timed[b].wall)
        return Row(row_id, what, measured, op, target, {**raw, **stats, **extra}, note)

    base = configs["sum_off"][1]
    zero, runs = base.deepspeed.zero_stage, zero_stage(base, 1)
    rows = [row("P1", f"harness sum step (1 worker, DeepSpeed ZeRO-{zero}: stage {runs} on one rank) "
                      f"÷ bare PyTorch loop", "sum_off", "bare", "<=", 1.05,
                batch=base.train.batch_size, zero_stage=zero, zero_stage_run=runs)]
    rows += [row("P2", f"{name}{' (published rule)' * (name == 'genrep')} step ÷ sum step ({label})",
                 f"{name}_{t}", f"sum_{t}", "<=", 1.10)
             for t, label in (("off", "distillation off"), ("kd", "default teacher"))
             for name in ("genrep", "pcgrad")]
    mc = configs["sum_kd"][1].method.mc
    # the timed blocks hold no refit of τ (one every calibrate_every steps): its cost is timed
    # apart and added amortised (ratio_of_medians in raw: the steps alone)
    cal = calibration_cost(timed["sum_kd"].fn, configs["sum_kd"][1])
    rows.append(row("P3", f"step with default MC teacher (K={mc.k}, every={mc.every}, subset="
                          f"{mc.subset:g}, prune {mc.prune_k}→{mc.prune_keep}, τ {mc.tau}) ÷ teacher off",
                    "sum_kd", "sum_off", "<=", 1.5, extra_s=cal.get("calibration_per_step_s", 0.0), **cal))
    rows.append(row("P3", "step with full teacher (K=8, every step, whole batch) ÷ teacher off",
                    "sum_full", "sum_off", note="shown beside P3, no target"))
    sem = configs["sum_sem"][1].method.semantic
    rows.append(row("P8", f"step with semantic-driven generation (enabled, rep_align 0.5; spatial x_sem "
                          f"of {sem.train_from}; sum, teacher off) ÷ without",
                    "sum_sem", "sum_off", "<=", 1.3))
    return rows


def run(settings: Settings) -> tuple[list[Row], dict[str, Any]]:
    """Rows P1-P3, and what P4 needs (the training step's images/s)."""
    configs = step_configs(settings)
    timed = measure_steps(settings, configs)
    memory = measure_memory({n: configs[n] for n in ("bare", "sum_off", "sum_kd", "sum_full")},
                            steps=2 * block_of(configs["sum_kd"][1]), threads=settings.threads)
    batch = configs["sum_off"][1].train.batch_size
    shared = {"step_images_per_s": batch / median(timed["sum_off"].wall),
              "step_images_per_s_kd": batch / median(timed["sum_kd"].wall), "batch": batch}
    return step_rows(timed, memory, configs), shared
