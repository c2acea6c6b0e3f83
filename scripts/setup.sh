#!/usr/bin/env bash
# Create .venv if missing and install genrep-bench with everything it needs (idempotent).
# torch comes first, pinned: on this CPU machine `torch==2.13.0` takes the CPU wheel on disk,
# while an unpinned torch pulls a multi-GB CUDA build. On a CUDA machine use instead:
#   TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.genrep-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
# DS_BUILD_OPS=0: DeepSpeed compiles no ops at install; the one it needs on CPU is JIT-built
# on first use into the project's cache (harness/engine.py).
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
