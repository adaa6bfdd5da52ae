#!/usr/bin/env bash
# The baselines study, one command per task: every method over the config's sparsity targets,
# results (CSV/JSON) and plots (PNG) under $OUT/TASK (default OUT=runs/study).
#
#   scripts/study.sh TASK [options]   TASK: a config of configs/study/ (sst2-minilm, mrpc-minilm, rte-minilm,
#                                     cola-minilm, stsb-minilm, wikitext2-smollm2, e2e-smollm2, alpaca-smollm2, xsum-smollm2)
#
# Options pass through to `lte study`: --jobs 8 (parallel worker processes), --time-limit 600, --collect,
# --tiny (CPU smoke run), --methods lte,teal, --targets 0.5,0.9, --set train.max_steps=100 (any config key).
# Finished points are kept: rerunning resumes. Runs from a checkout without installing (PYTHONPATH=src).
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:?usage: scripts/study.sh TASK [options]; TASK is one of: $(ls configs/study | sed 's/\.yaml$//' | tr '\n' ' ')}
shift
CONFIG="configs/study/$TASK.yaml"
if [ ! -f "$CONFIG" ]; then
    echo "no study config $CONFIG; choose one of: $(ls configs/study | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
fi
OUT=${OUT:-runs/study}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m lte.cli.main -v study "$CONFIG" --out "$OUT/$TASK" "$@"
