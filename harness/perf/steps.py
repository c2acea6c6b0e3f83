"""P1, P2, P3: the cost of one training step, harness against bare PyTorch and configuration
against configuration, all timed interleaved in one process with real DeepSpeed engines.

P1  harness step (``JointStep``, ``sum``, DeepSpeed engine as the worker builds it) ÷ a bare loop
    (same GenRepModel, same losses, same AdamW, no DeepSpeed, no harness);
P2  ``genrep`` and ``pcgrad`` ÷ ``sum`` (distillation off, and with the shipped default teacher);
P3  ``sum`` with the shipped default teacher ÷ ``sum`` without, and full K=8 every step beside it,
    with each configuration's peak memory from a fresh subprocess (harness.perf.memory).
"""
from __future__ import annotations

from typing import Any

import torch

from genrep.diffusion import make_scheduler
from genrep.losses import cross_entropy, denoising_loss_given
from genrep.model import build_model
from harness.config import TrialConfig
from harness.engine import zero_stage
from harness.perf.common import (Row, Settings, Timed, median, process_group, ratio_stats,
                                 synthetic_batch, teacher_default, teacher_full, teacher_off,
                                 time_interleaved, timing_raw, trial)
from harness.perf.memory import measure_memory


class BareLoop:
    """The reference: GenRepModel + L_ce + L_gen + AdamW in plain PyTorch, one backward of the sum.

    Draws (t, ε, label dropout) come from a per-step generator like the harness's, so both loops do
    the same arithmetic; the LR schedule (constant here) and all metrics are left out.
    """

    def __init__(self, cfg: TrialConfig):
        t = cfg.train
        self.model = build_model(cfg.model_config(), seed=cfg.seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.betas,
                                     weight_decay=t.weight_decay)
        self.alphas_cumprod = make_scheduler().alphas_cumprod
        self.p_uncond, self.seed = cfg.method.p_uncond, cfg.seed

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        t = torch.randint(0, len(self.alphas_cumprod), (x.shape[0],), generator=g)
        noise = torch.randn(x.shape, generator=g)
        drop = torch.rand(x.shape[0], generator=g) < self.p_uncond
        c = torch.where(drop, torch.full_like(y, self.model.null_class), y)
        loss_g, _ = denoising_loss_given(self.model.eps, x, c, t, noise, self.alphas_cumprod)
        loss_p, _ = cross_entropy(self.model.logits(x), y)
        (loss_p + loss_g).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_p.detach() + loss_g.detach()


def step_configs(settings: Settings) -> dict[str, tuple[str, TrialConfig]]:
    """name -> (kind, trial config): every configuration P1-P3 time, built from the sweep's trial."""
    off, kd, full = teacher_off(), teacher_default(), teacher_full()
    base = trial(settings, "sum", **off)
    configs = {"bare": ("bare", base), "sum_off": ("harness", base)}
    if base.deepspeed.zero_stage != 0:  # what one rank would pay to keep the stage (P1, info)
        configs["sum_off_keep"] = ("harness", trial(settings, "sum", **off,
                                                    **{"deepspeed.zero_on_one_rank": True}))
    for name in ("genrep", "pcgrad"):
        configs[f"{name}_off"] = ("harness", trial(settings, name, **off))
    for name in ("sum", "genrep", "pcgrad"):
        configs[f"{name}_kd"] = ("harness", trial(settings, name, **kd))
    configs["sum_full"] = ("harness", trial(settings, "sum", **full))
    return configs


def build(kind: str, cfg: TrialConfig):
    from harness.step import Shard, make_step

    if kind == "bare":
        return BareLoop(cfg)
    return make_step(cfg, Shard(0, 1, cfg.train.batch_size), torch.device("cpu"))


def block_of(cfg: TrialConfig, default_block: int) -> int:
    """Steps per timed block: whole teacher periods; one step where every step is alike."""
    if cfg.method.beta_kd > 0 and cfg.method.mc.every == 1 and cfg.method.mc.subset == 1.0:
        return 1  # full teacher every step: the costliest configuration, and all its steps alike
    return default_block


def measure_steps(settings: Settings):
    """Per-step wall and CPU seconds of every configuration, per round (interleaved, warm-up
    excluded), and the configurations."""
    configs = step_configs(settings)
    default_block = max(4, trial(settings, **teacher_default()).method.mc.every)
    with process_group():
        timed = {}
        for name, (kind, cfg) in configs.items():
            x, y = synthetic_batch(cfg)
            timed[name] = Timed(build(kind, cfg), x, y, block_of(cfg, default_block))
        times = time_interleaved(timed, settings.repeats, settings.warmup)
    return times, {n: timed[n].cpu for n in timed}, configs


def step_rows(times: dict[str, list[float]], cpu: dict[str, list[float]],
              configs: dict[str, tuple[str, TrialConfig]], memory: dict[str, dict]) -> list[Row]:
    batch = configs["sum_off"][1].train.batch_size

    def raw(*names):
        cpu_ratio = median(cpu[names[0]]) / median(cpu[names[1]])
        return {**{n: {**timing_raw(times[n], cpu[n]), **memory.get(n, {})} for n in names},
                "cpu_time_ratio": cpu_ratio}

    base = configs["sum_off"][1]
    zero, runs = base.deepspeed.zero_stage, zero_stage(base, 1)
    rows = [Row("P1", f"harness sum step (1 worker, DeepSpeed ZeRO-{zero}: stage {runs} on one rank) "
                      f"÷ bare PyTorch loop",
                ratio_stats(times["sum_off"], times["bare"])["ratio_of_medians"], "<=", 1.05,
                {**raw("sum_off", "bare"), **ratio_stats(times["sum_off"], times["bare"]),
                 "batch": batch, "zero_stage": zero, "zero_stage_run": runs})]
    if "sum_off_keep" in times:
        rows.append(Row("P1", f"harness sum step with ZeRO-{zero} kept on one rank ÷ bare PyTorch loop",
                        median(times["sum_off_keep"]) / median(times["bare"]), "info", float("nan"),
                        {**raw("sum_off_keep", "bare"), **ratio_stats(times["sum_off_keep"], times["bare"])},
                        note="deepspeed.zero_on_one_rank: what one rank pays for a stage that "
                             "partitions nothing; no target"))
    for teacher, label in (("off", "distillation off"), ("kd", "default teacher")):
        for name in ("genrep", "pcgrad"):
            a, b = f"{name}_{teacher}", f"sum_{teacher}"
            rows.append(Row("P2", f"{name} step ÷ sum step ({label})",
                            median(times[a]) / median(times[b]), "<=", 1.10,
                            {**raw(a, b), **ratio_stats(times[a], times[b])}))
    mc = configs["sum_kd"][1].method.mc
    rows.append(Row("P3", f"step with default MC teacher (K={mc.k}, every={mc.every}, "
                          f"subset={mc.subset:g}, prune {mc.prune_k}→{mc.prune_keep}) ÷ teacher off",
                    median(times["sum_kd"]) / median(times["sum_off"]), "<=", 1.5,
                    {**raw("sum_kd", "sum_off"), **ratio_stats(times["sum_kd"], times["sum_off"]),
                     "teacher_evals_per_step": teacher_evals(configs["sum_kd"][1])}))
    rows.append(Row("P3", "step with full teacher (K=8, every step, whole batch) ÷ teacher off",
                    median(times["sum_full"]) / median(times["sum_off"]), "info", float("nan"),
                    {**raw("sum_full", "sum_off"),
                     "teacher_evals_per_step": teacher_evals(configs["sum_full"][1])},
                    note="shown beside P3, no target"))
    return rows


def teacher_evals(cfg: TrialConfig) -> float:
    """Network evaluations of the teacher per training step, amortised over ``every`` steps."""
    mc, c = cfg.method.mc, cfg.model_config().num_classes
    n = max(1, round(mc.subset * cfg.train.batch_size))
    per_image = mc.k * c
    if mc.prune_keep is not None and mc.prune_k < mc.k and mc.prune_keep < c:
        per_image = mc.prune_k * c + (mc.k - mc.prune_k) * mc.prune_keep
    return n * per_image / mc.every


def run(settings: Settings) -> tuple[list[Row], dict[str, Any]]:
    """Rows P1-P3 and what P4 needs (the training step's images/s)."""
    times, cpu, configs = measure_steps(settings)
    mem_names = ["bare", "sum_off", "sum_kd", "sum_full"]
    memory = measure_memory({n: configs[n] for n in mem_names}, steps=2 * max(4, configs["sum_kd"][1].method.mc.every),
                            threads=settings.threads, parallel=settings.quick)
    batch = configs["sum_off"][1].train.batch_size
    shared = {"step_images_per_s": batch / median(times["sum_off"]),
              "step_images_per_s_kd": batch / median(times["sum_kd"]), "batch": batch}
    return step_rows(times, cpu, configs, memory), shared


def profile(settings: Settings, names: tuple[str, ...] = ("bare", "sum_off", "genrep_off", "pcgrad_off"),
            steps: int = 8, rows: int = 30) -> str:
    """torch.profiler tables (self CPU time) of a few steps of each configuration, after warm-up:
    where the time of a ratio that misses its target goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(settings.threads)
    configs = step_configs(settings)
    out = []
    with process_group():
        for name in names:
            kind, cfg = configs[name]
            fn, (x, y) = build(kind, cfg), synthetic_batch(cfg)
            for step in range(2 * steps):  # warm-up
                fn(x, y, step)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for step in range(2 * steps, 3 * steps):
                    fn(x, y, step)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            out.append(f"===== {name}: {steps} steps\n{table}")
    return "\n".join(out)

