#!/usr/bin/env bash
# Speed work of issues 11 and 12 in one GPU call (random weights: no carry needed), a short table last.
#
#   1. the GPU tests (pytest -m gpu tests/, or the ones GPU_TESTS names; full output in $OUT/gpu_tests.txt), and
#      python -m lte.kernels.selfcheck --parts topk routed act
#   2. the mask launches alone (benchmarks/mask_kernels.py, Llama-3-8B shape, expert sizes 32 and 8)
#   3. the decode step at B = 8 with per-token threshold masks and with top-k routing, each also under a 0.5
#      budget (benchmarks/decode.py, against dense)
#   4. the compiled stage-1 step against the dense step, default mode and reduce-overhead (TRAIN_MODES picks:
#      e.g. TRAIN_MODES=reduce-overhead)
#      (benchmarks/train_step.py, SmolLM2 shapes, `ste`)
#   attn (not in the default list): the decode step, Llama-3-8B shape, B = 8 and 32, fixed masks at 50% and 90%,
#      with transformers' SDPA (`benchmarks/decode.py --no-gqa-decode`), lte.serving.attention's grouped heads through
#      SDPA (`--decode-attention sdpa`) and through the split-KV Triton kernel (`--decode-attention triton`, the
#      default on CUDA), each against its own dense rows
#   attnlen (not in the default list): the decode step, Llama-3-8B shape, dense and LTE at 50%, with the grouped heads
#      through SDPA and through the Triton kernel at longer caches (ATTN_LENS, default "2048 8192"; B = 1, 8, 32, and
#      1, 8 above 4096 slots)
#   mha (not in the default list): the decode step of the LLaMA-2-7B shape (no grouped heads: the default leaves it on
#      transformers' SDPA) with `--decode-attention sdpa` and `triton` (the kernel, named outright), B = 1, 8, 32
#   profile (not in the default list): the decode step of a Llama-3-8B shape at B = 1 split into its FFN and the rest
#      (dense, LTE at 50%, and the same step with no FFN), with each variant's GPU kernels by kind
#      (benchmarks/decode_profile.py --compile; PROFILE_MODES picks the Inductor modes, e.g.
#      PROFILE_MODES="default max-autotune-no-cudagraphs"; PROFILE_SDPA="triton auto efficient math flex" (default
#      triton) compares decode attentions: triton lte.serving.attention's split-KV kernel (the default on CUDA), flex
#      its flex_attention path, the others SDPA backends over the grouped heads; PROFILE_BLAS="auto cublas cublaslt"
#      the BLAS library torch's projections prefer)
#   prefetch (not in the default list): the same B = 1 profile with one setting changed from this GPU's own tiles:
#      PREFETCH_VARIANTS="prefetch nopdl" (default prefetch): KernelConfig.out_prefetch on (the down kernel reads its
#      share's first expert before it waits for the gate/up kernel); PDL off (each kernel's profiled time its own)
#   ffn (not in the default list): the FFN alone (router + kernels) against dense cuBLAS at B = FFN_TOKENS (default
#      "1 8"), Llama-3-8B shape (benchmarks/ffn_kernel.py; after `tune`, with its table)
#   tune (not in the default list): tile tuning for this GPU (benchmarks/tune_kernels.py, Llama-3-8B shape,
#      TUNE_BUDGET seconds, default 150) into $OUT/kernel_configs.json; the parts after it run with that table
#      (LTE_KERNEL_CONFIGS), so `tune masks decode` times the tuned kernels
#
# Usage:  OUT=/path/to/results bash scripts/gpu/speed_check.sh [PART ...]   (parts: tests tune ffn masks decode attn attnlen mha profile prefetch train;
#         default tests masks decode train, attn and tune when named; about 8 minutes on an H100 with every GPU test, plus the tuning). Run from the project
#         root; set LTE_COMMIT first on the GPU machine (scripts/gpu/README.md).
set -uo pipefail

OUT=${OUT:-runs/speed_check}
PARTS=("$@")
[[ ${#PARTS[@]} == 0 ]] && PARTS=(tests masks decode train)
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
want() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }
summary=()

if want tests; then
  # every GPU test (about 190 s on an H100) unless GPU_TESTS names some (e.g. GPU_TESTS="tests/test_kernels.py -k topk");
  # the whole output, tracebacks included, goes to $OUT/gpu_tests.txt (2026-12-07: a failure's summary line alone
  # left its cause to guesswork)
  # shellcheck disable=SC2086
  python -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu ${GPU_TESTS:-tests/} > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.txt"
  summary+=("gpu tests (${GPU_TESTS:-all}): $(tail -1 "$OUT/gpu_tests.txt")")
  python -m lte.kernels.selfcheck --parts topk routed act 2>&1 | tail -3 | tee "$OUT/selfcheck.txt"
  summary+=("selfcheck (topk, routed, act): $(tail -1 "$OUT/selfcheck.txt")")
fi
if want tune; then
  python benchmarks/tune_kernels.py --budget "${TUNE_BUDGET:-150}" --shapes llama3-8b --out "$OUT/kernel_configs.json" \
    2>&1 | tail -6
  [[ -f "$OUT/kernel_configs.json" ]] && export LTE_KERNEL_CONFIGS="$OUT/kernel_configs.json"
  summary+=("tuned tiles: $OUT/kernel_configs.json (used by the parts after it)")
fi
if want ffn; then  # the FFN alone against dense cuBLAS, with the tuned table when `tune` ran before it
  # shellcheck disable=SC2086
  python benchmarks/ffn_kernel.py --budget "${FFN_BUDGET:-90}" --shapes llama3-8b --tokens ${FFN_TOKENS:-1 8} \
    --out "$OUT/ffn" 2>&1 | grep -E "^ +llama3-8b|dispatch" | tee "$OUT/ffn.txt"
  summary+=("FFN vs dense cuBLAS: $OUT/ffn/ffn_kernel.json")
fi
if want masks; then
  python benchmarks/mask_kernels.py --shapes llama3-8b --out "$OUT/mask_kernels.json" 2>&1 | tail -8
  summary+=("mask launches: $OUT/mask_kernels.json")
fi
if want decode; then
  python benchmarks/decode.py --shapes llama3-8b --batch-sizes 8 --sparsities 0.5 --mask-modes random topk \
    --batch-budget 0.5 --random-sparsities 0.5 0.9 --budget 90 --runs 3 --out "$OUT/decode_topk_budget.json" \
    2>&1 | tail -12
  summary+=("decode B=8 top-k + budget: $OUT/decode_topk_budget.json")
fi
if want attn; then
  python -m pytest -q -p no:cacheprovider -m gpu tests/test_gqa_attention.py 2>&1 | tail -3 | tee "$OUT/gpu_tests_attn.txt"
  summary+=("gpu tests (grouped-query decode attention): $(tail -1 "$OUT/gpu_tests_attn.txt")")
  for mode in sdpa gqa triton; do
    flag=(--decode-attention "$mode"); [[ $mode == sdpa ]] && flag=(--no-gqa-decode)
    [[ $mode == gqa ]] && flag=(--decode-attention sdpa)
    python benchmarks/decode.py --shapes llama3-8b --batch-sizes 8 32 --sparsities 0.5 0.9 --mask-modes fixed \
      --runs 3 --budget 150 "${flag[@]}" --out "$OUT/decode_attn_${mode}.json" 2>&1 | tail -10
    summary+=("decode step, attention $mode: $OUT/decode_attn_${mode}.json")
  done
fi
if want attnlen; then  # the decode attentions at longer caches (the Triton kernel became the CUDA default at 512 slots)
  for len in ${ATTN_LENS:-2048 8192}; do
    batches=(1 8 32); [[ $len -gt 4096 ]] && batches=(1 8)  # B = 32 x 8192 slots: 34 GB of cache beside two models
    for kind in sdpa triton; do
      python benchmarks/decode.py --shapes llama3-8b --batch-sizes "${batches[@]}" --sparsities 0 0.5 --mask-modes fixed \
        --runs 2 --budget 120 --cache-len "$len" --decode-attention "$kind" --out "$OUT/decode_len${len}_${kind}.json" \
        2>&1 | grep -E "^ +llama3-8b +[0-9]+ " | tee -a "$OUT/attnlen.txt"
      summary+=("decode step, $len slots, attention $kind: $OUT/decode_len${len}_${kind}.json")
    done
  done
fi
if want mha; then  # LLaMA-2-7B (one query head per KV head): transformers' SDPA against the Triton kernel named outright
  for kind in sdpa triton; do
    python benchmarks/decode.py --shapes llama2-7b --batch-sizes 1 8 32 --sparsities 0 0.5 --mask-modes fixed --runs 2 \
      --budget 100 --decode-attention "$kind" --out "$OUT/decode_mha_${kind}.json" 2>&1 | grep -E "^ +llama2-7b +[0-9]+ " \
      | tee -a "$OUT/mha.txt"
    summary+=("decode step, LLaMA-2-7B, attention $kind: $OUT/decode_mha_${kind}.json")
  done
fi
if want profile; then  # where a B = 1 step's time goes: dense, LTE at 50%, no FFN at all, and their kernels
  for mode in ${PROFILE_MODES:-default}; do
    for sdpa in ${PROFILE_SDPA:-triton}; do  # e.g. PROFILE_SDPA="triton auto flex": attention to compare
      for blas in ${PROFILE_BLAS:-auto}; do  # e.g. PROFILE_BLAS="auto cublas": the projections' BLAS library
        attn=(--decode-attention sdpa --sdpa "$sdpa")  # an SDPA backend over the grouped heads
        [[ $sdpa == flex || $sdpa == triton ]] && attn=(--decode-attention "$sdpa")  # flex_attention's / ours (split-KV)
        name="b1_${mode}_${sdpa}"; [[ $blas != auto ]] && name+="_${blas}"
        python benchmarks/decode_profile.py --shape llama3-8b --batch 1 --sparsity 0.5 --compile "$mode" \
          "${attn[@]}" --blas "$blas" --out "$OUT/decode_profile_${name}.json" 2>&1 | tail -8
        summary+=("decode step profile, B=1, compile $mode, sdpa $sdpa, blas $blas: $OUT/decode_profile_${name}.json")
      done
    done
  done
fi
if want prefetch; then  # B = 1 profile with one setting changed from this GPU's own tiles (PREFETCH_VARIANTS picks):
  # prefetch: the down kernel reads its first expert's rows before it waits (out_prefetch); nopdl: no programmatic
  # dependent launch, so each kernel's profiled time is its own (with PDL a kernel's time includes its waiting)
  for variant in ${PREFETCH_VARIANTS:-prefetch}; do
    python - "$OUT/kernel_configs_${variant}.json" "$variant" <<'PY'
import dataclasses, json, sys

import torch

from lte.kernels.tuning import gpu_key, heuristic_config, lookup, shape_key

gpu = gpu_key(torch.cuda.get_device_name())
props = torch.cuda.get_device_properties(0)
cfg = lookup(gpu, 4096, 14336, 1) or heuristic_config(1, 4096, 14336, props.multi_processor_count)
change = {"prefetch": {"out_prefetch": True}, "nopdl": {"pdl": False, "router_pdl": False}}[sys.argv[2]]
row = dataclasses.replace(cfg, **change).to_dict()
json.dump({"table": {gpu: {shape_key(4096, 14336): {"1": row}}}}, open(sys.argv[1], "w"), indent=1)
print(sys.argv[2], "row:", row)
PY
    LTE_KERNEL_CONFIGS="$OUT/kernel_configs_${variant}.json" python benchmarks/decode_profile.py --shape llama3-8b \
      --batch 1 --sparsity 0.5 --compile default --out "$OUT/decode_profile_b1_default_${variant}.json" 2>&1 | tail -8
    summary+=("decode step profile, B=1, $variant (compare with the profile part's): $OUT/decode_profile_b1_default_${variant}.json")
  done
fi
if want train; then
  for mode in ${TRAIN_MODES:-default reduce-overhead}; do
    python benchmarks/train_step.py --routing ste --compile --compile-mode "$mode" --rounds 3 \
      --out "$OUT/train_step_ste_${mode}.json" 2>&1 | tail -1 | tee "$OUT/train_step_${mode}.txt"
    summary+=("stage-1 step, compiled ($mode): $(cat "$OUT/train_step_${mode}.txt")")
  done
fi

echo
echo "== summary =="
printf '%s\n' "${summary[@]}"
