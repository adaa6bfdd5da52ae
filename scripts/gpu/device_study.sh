#!/usr/bin/env bash
# On the GPU machine (no network): run study configs in parallel worker processes, then pack
# the results (CSV/JSON/PNG and logs, no weights) into $OUT/study_results.tar.gz.
#
#   bash scripts/gpu/device_study.sh --jobs 14 --time-limit 420 configs/study/sst2-minilm.yaml ... [lte study options]
#   RESUME_FROM=benchmarks/results/recipe bash scripts/gpu/device_study.sh ...   # continue a committed study
#
# Studies live in $STUDY_ROOT (default: $LTE_DEVICE_DIR/study, outside the repo), so a later call
# on the same warm machine resumes them: finished points are reused, only missing ones run, and a
# unit stopped at --time-limit continues from the checkpoint it wrote (it gets up to 60 s to write
# it). Give the device call a timeout of at least the time limit + 120 s: loading, the last
# evaluations and the reports took 87 s past a 480 s limit on the H200. If the call is stopped anyway,
# whatever finished is still in $OUT: the results are packed every PACK_EVERY seconds (default 60) while the
# study runs, and on SIGTERM they are packed first, before the workers are asked to write checkpoints (on
# 2026-12-06 a call stopped at its device limit returned nothing: the old trap waited on the workers first).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/device_env.sh
ROOT=${STUDY_ROOT:-$LTE_DEVICE_DIR/study}
mkdir -p "$ROOT"
# Results of earlier sessions: RESUME_FROM names folders of committed study results (e.g.
# benchmarks/results/recipe, holding <study>/seed<N>/<method>/t<target>/point.json); they are copied
# into $ROOT without overwriting, so their finished points are reused and only missing ones run.
for old in ${RESUME_FROM:-}; do
    [ -d "$old" ] && cp -rn "$old"/. "$ROOT"/
done
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PY=${PYTHON:-python3}
# GPU load while the study runs (is the GPU or the CPU side the limit at this many workers?):
# nvidia-smi dmon's utilisation and memory every 5 s into $OUT/gpu_load.txt.
dmon=""
if [ -n "${OUT:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi dmon -s um -d 5 > "$OUT/gpu_load.txt" 2>&1 &
    dmon=$!
fi
# LTE_MPS=1: run the workers under CUDA MPS, so their kernels share the GPU at once instead of taking
# turns (worker processes of a small model each leave it mostly idle). Tried only if the control
# binary exists and a CUDA call then works within 60 s; otherwise the daemon is stopped and the
# study runs without it. Experimental: not yet seen working on these machines.
mps=""
if [ "${LTE_MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-$LTE_DEVICE_DIR/mps/pipe}
    export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-$LTE_DEVICE_DIR/mps/log}
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 60 "$PY" -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
        mps=1
        echo "device_study: CUDA MPS on"
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        echo "device_study: CUDA MPS did not start; running without it"
    fi
fi
stop_helpers() {
    [ -n "$dmon" ] && kill "$dmon" 2>/dev/null
    [ -n "$mps" ] && echo quit | nvidia-cuda-mps-control 2>/dev/null
    dmon="" mps=""
}
# pack_results: the results so far into $OUT/study_results.tar.gz (written aside, then moved: a call cut
# while it packs keeps the previous archive). Points are written atomically, so any archive holds whole ones.
pack_results() {
    [ -n "${OUT:-}" ] || return 0
    tar -C "$ROOT" -czf "$OUT/.study_results.tar.gz.part" \
        --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='checkpoint-*' \
        --exclude='tokenizer*' --exclude='events.out.*' . 2>/dev/null \
        && mv "$OUT/.study_results.tar.gz.part" "$OUT/study_results.tar.gz"
}
packer=""
if [ -n "${OUT:-}" ]; then
    ( while sleep "${PACK_EVERY:-60}"; do pack_results; done ) &
    packer=$!
fi
pack() {
    [ -n "$packer" ] && kill "$packer" 2>/dev/null
    packer=""
    stop_helpers
    pack_results
    [ -n "${OUT:-}" ] && ls -la "$OUT"
}
# GPU_TESTS="tests/test_kernels.py": those GPU tests run beside the study on the same GPU (correctness only, no timing;
# about 200 s for the kernel tests on an H100), the whole output in $OUT/gpu_tests.txt, their summary printed last. A
# call then checks the kernels without device time of its own (2026-12-07: 75 kernel tests beside an MPNet study at
# --jobs 8). With a SmolLM2 study near the GPU's memory, lower --jobs: the tests hold a few GB.
tests=""
if [ -n "${GPU_TESTS:-}" ] && [ -n "${OUT:-}" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu $GPU_TESTS > "$OUT/gpu_tests.txt" 2>&1 &
    tests=$!
fi
report_tests() {
    [ -n "$tests" ] || return 0
    wait "$tests"
    echo "gpu tests ($GPU_TESTS) beside the study: $(tail -1 "$OUT/gpu_tests.txt")"
    grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.txt"
    tests=""
}
study=""
trap 'pack; [ -n "$study" ] && { kill -TERM "$study" 2>/dev/null; wait "$study"; pack_results; }; exit 143' TERM
"$PY" -m lte.cli.main -v study "$@" --root "$ROOT" 2> >(grep -v "study units" >&2) &
study=$!
wait "$study"
status=$?
trap - TERM
pack
report_tests
exit $status
