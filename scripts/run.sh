#!/usr/bin/env bash
# The main job: install if needed, then run the smoke sweep on embedded local Ray (CPU, gloo,
# DeepSpeed), on scikit-learn's digits packed into webdataset shards on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/genrep-bench sweep "${1:-sweeps/smoke.yaml}" --overwrite
