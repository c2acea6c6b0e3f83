#!/usr/bin/env bash
# One short trial on the GPU path: CUDA torch, NCCL, DeepSpeed bf16, a GPU per Ray Train worker.
# NOT RUN where it was written (no GPU there): run it on a machine with a CUDA device, from the
# repository root, after `TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
# bash scripts/setup.sh`. It prints what the device is, what the trial measured, and exits non-zero
# when any piece of the GPU path is missing or the trial fails. See docs/cluster.md.
#
#   bash scripts/gpu_check.sh [WORKERS]     # WORKERS: GPUs (Train workers) for the trial, default 1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKERS=${1:-1}
OUT=$(mktemp -d /tmp/genrep-gpu-check.XXXXXX)

echo "== device"
"$PY" - "$WORKERS" <<'PY'
import sys, torch, torch.distributed as dist
workers = int(sys.argv[1])
print(f"torch {torch.__version__}  CUDA build {torch.version.cuda}  devices {torch.cuda.device_count()}")
problems = []
if not torch.cuda.is_available():
    problems.append("no CUDA device visible to torch (CPU build of torch? see scripts/setup.sh)")
elif torch.cuda.device_count() < workers:
    problems.append(f"{workers} workers asked, {torch.cuda.device_count()} devices")
else:
    print(f"device 0: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    print(f"NCCL available: {dist.is_nccl_available()}, version {torch.cuda.nccl.version()}")
    if not torch.cuda.is_bf16_supported():
        problems.append("the device has no bf16 (pre-Ampere): use precision fp16")
if problems:
    sys.exit("gpu_check: " + "; ".join(problems))
PY

# smoke.yaml's model and data (digits, packed locally: no network), with gpu_multinode.yaml's
# GPU settings: bf16, NCCL, one GPU per worker, ZeRO-2 (ZeRO is dropped on one rank)
cat > "$OUT/gpu_check.yaml" <<YAML
name: gpu_check
output_dir: $OUT/results
strategies: [genrep]
seeds: [0]
data: {source: digits, image_size: 16, shard_size: 400, root: $OUT/data}
model: {preset: digits16}
method: {beta_kd: 1.0, mc: {k: 4, every: 4, subset: 0.25}}
train: {steps: 100, batch_size: $((32 * WORKERS)), lr: 0.002, log_every: 20}
eval: {mc_k: 4, mc_images: 32, samples_per_class: 4, ddim_steps: 10}
deepspeed: {zero_stage: 2, precision: bf16, backend: nccl}
resources: {workers: $WORKERS, gpus_per_worker: 1.0, cpus_per_worker: 2.0, max_concurrent: 1, max_failures: 0}
YAML

echo "== trial (100 steps, bf16, NCCL, $WORKERS GPU worker(s))"
start=$(date +%s)
"$PY" -m harness.cli sweep "$OUT/gpu_check.yaml"
echo "== measured"
"$PY" - "$OUT/results" "$(( $(date +%s) - start ))" <<'PY'
import sys
from harness.results import read_results
df = read_results(sys.argv[1])
cfg = df.iloc[0]
print(f"sweep wall {sys.argv[2]} s; precision {cfg['cfg.deepspeed.precision']}, backend "
      f"{cfg['cfg.deepspeed.backend']}, gpus_per_worker {cfg['cfg.resources.gpus_per_worker']}")
for metric in ("loss_gen", "loss_ce", "step_time", "images_per_s", "head_acc"):
    rows = df[df.metric == metric]
    if len(rows):
        last = rows.sort_values("step").iloc[-1]
        print(f"{metric:>12} = {last['value']:.4g}  ({last['split']}, step {last['step']})")
ok = set(df["status"]) == {"ok"}
print("gpu_check:", "ok" if ok else f"FAILED: {df['error'].dropna().unique()}")
sys.exit(0 if ok else 1)
PY
echo "results: $OUT/results"
