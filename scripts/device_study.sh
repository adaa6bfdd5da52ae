#!/usr/bin/env bash
# On the GPU machine (no network): run study configs in parallel worker processes, then pack
# the results (CSV/JSON/PNG and logs, no weights) into $OUT/study_results.tar.gz.
#
#   bash scripts/device_study.sh --jobs 14 --time-limit 420 configs/study/sst2-minilm.yaml ... [lte study options]
#
# Studies live in $STUDY_ROOT (default: $LTE_DEVICE_DIR/study, outside the repo), so a later call
# on the same warm machine resumes them: finished points are reused, only missing ones run.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
ROOT=${STUDY_ROOT:-$LTE_DEVICE_DIR/study}
mkdir -p "$ROOT"
# Results of earlier sessions (carry/results/*.tar.gz, made by this script): finished points are reused.
for old in carry/results/*.tar.gz; do
    [ -f "$old" ] && [ ! -f "$ROOT/.unpacked-$(basename "$old")" ] && tar -C "$ROOT" -xzf "$old" \
        && touch "$ROOT/.unpacked-$(basename "$old")"
done
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PY=${PYTHON:-python3}
"$PY" -m lte.cli.main -v study "$@" --root "$ROOT" 2> >(grep -v "study units" >&2)
status=$?
if [ -n "${OUT:-}" ]; then
    tar -C "$ROOT" -czf "$OUT/study_results.tar.gz" \
        --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='checkpoint-*' \
        --exclude='tokenizer*' --exclude='events.out.*' .
    ls -la "$OUT"
fi
exit $status
