#!/usr/bin/env bash
# Issue 12 on one GPU, about 4-6 minutes on an H200 (no model files needed: random weights):
#   1. benchmarks/peft_memory.py: peak memory and tokens/s of full fine-tuning, dense LoRA and LoRA-LTE
#      (stages 1 and 2) on a LLaMA-2-7B shape, bf16 -> $OUT/peft_memory.json
#   2. benchmarks/train_step.py: the full-parameter stage-1 step against the dense step, SmolLM2-135M
#      shapes (soft, then straight-through stage 1) -> $OUT/train_step{,_ste}.json, and where the
#      straight-through step's time goes (torch.profiler) -> $OUT/profile_ste/; and the straight-through
#      step under torch.compile -> $OUT/train_step_ste_compiled.json (and its profile -> $OUT/profile_ste_compiled/);
#      and the straight-through step on 4 of
#      LLaMA-2-7B's layers (full fine-tuning) -> $OUT/train_step_7b.json
#
#   OUT=/path bash scripts/gpu/peft_bench.sh [--tiny]     # --tiny: CPU smoke test of the whole script
#   PEFT_PARTS="compile 7b" ...: only those parts (memory, eager, compile, 7b; default all four), e.g. to
#   time the compiled step in a call of its own (compiling both models took most of a 280 s call)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-runs/peft_bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--tiny" ]]; then
    MEM=(--shape tiny --steps 2 --warmup 1); STEP=(--tiny --steps 2 --warmup 1)
else
    MEM=(); STEP=(--steps 20 --warmup 5 --rounds 3)  # 3 rounds alternating dense and stage 1: steadier ratios
fi
PARTS=" ${PEFT_PARTS:-memory eager compile 7b} "
if [[ "${PEFT_MEMORY:-1}" == 0 ]]; then PARTS=${PARTS/ memory / }; fi  # older spelling: PEFT_MEMORY=0
want() { [[ "$PARTS" == *" $1 "* ]]; }
for part in $PARTS; do
    case "$part" in memory|eager|compile|7b) ;; *) echo "peft_bench.sh: unknown part '$part' in PEFT_PARTS (parts: memory eager compile 7b)" >&2; exit 2 ;; esac
done
start=$(date +%s)
if want memory; then
    echo "== LoRA-LTE memory and speed (7B shape) =="
    "$PY" benchmarks/peft_memory.py "${MEM[@]}" --budget-s 300 --out "$OUT/peft_memory.json"
    echo "elapsed: $(( $(date +%s) - start )) s"
fi
if want eager; then
    echo "== stage-1 step vs dense step (SmolLM2 shapes) =="
    "$PY" benchmarks/train_step.py "${STEP[@]}" --count-ops --out "$OUT/train_step.json" | tail -4
    "$PY" benchmarks/train_step.py "${STEP[@]}" --routing ste --out "$OUT/train_step_ste.json" \
        --profile "$OUT/profile_ste" | tail -3
fi
if want compile; then
    echo "== the same under torch.compile (lte train --torch-compile) =="
    "$PY" benchmarks/train_step.py "${STEP[@]}" --routing ste --compile --out "$OUT/train_step_ste_compiled.json" \
        --profile "$OUT/profile_ste_compiled" | tail -1
fi
if want 7b; then
    echo "== stage-1 step vs dense step (LLaMA-2-7B layers, 4 of 32) =="
    if [[ "${1:-}" == "--tiny" ]]; then BIG=(--tiny); else BIG=(--shape llama2-7b-4l --batch-size 4); fi
    "$PY" benchmarks/train_step.py "${STEP[@]}" "${BIG[@]}" --routing ste --out "$OUT/train_step_7b.json" | tail -1
fi
echo "elapsed: $(( $(date +%s) - start )) s"
