#!/usr/bin/env bash
# Stage-1 LTE training of a LLaMA-2-7B-shaped model under FSDP on 1, 2 and all GPUs (issue 13).
# From the repository root:
#
#     OUT=/some/dir PYTHONPATH=src bash benchmarks/fsdp_scaling.sh [--sizes "1 2 8"] [--cap SECONDS] [-- ARGS]
#
# Each world size runs in its own `accelerate launch --config_file configs/accelerate/fsdp.yaml
# --num_processes N benchmarks/fsdp_scaling.py` under a time cap (default 240 s); a failure (out of
# memory, a timeout) is recorded in $OUT/runs.txt and the next size still runs. ARGS after `--` go
# to fsdp_scaling.py (e.g. --seq-len 1024 --batch-size 2). Last, the table of every size that
# finished: $OUT/summary.json (tokens/s, tokens/s per GPU, scaling efficiency, peak memory per GPU).
# CPU smoke run: LTE_FSDP_SMOKE=1 (tiny shape, 1 and 2 processes; on CPUs accelerate trains with DDP).
set -u

OUT="${OUT:?set OUT to the output folder}"
CAP=240
SIZES=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) SIZES="$2"; shift ;;
    --cap) CAP="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument $1 (bench arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1
export PYTHONPATH="${PYTHONPATH:-src}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
: > "$OUT/runs.txt"

if [ "${LTE_FSDP_SMOKE:-0}" = 1 ]; then
  SIZES="${SIZES:-1 2}"
  EXTRA+=(--tiny --steps 2 --warmup 1)
  export OMP_NUM_THREADS=1
else
  GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$GPUS" -ge 1 ] || { echo "no GPU found (LTE_FSDP_SMOKE=1 for a CPU smoke run)" >&2; exit 1; }
  SIZES="${SIZES:-$(printf '%s\n' 1 2 "$GPUS" | awk -v g="$GPUS" '$1 <= g' | sort -un | tr '\n' ' ')}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.csv" 2>&1
fi

PORT=29611
for N in $SIZES; do
  echo "=== $N process(es), cap ${CAP} s ==="
  timeout -k 15 "$CAP" "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml \
    --num_processes "$N" --main_process_port "$PORT" benchmarks/fsdp_scaling.py \
    --out "$OUT/fsdp_n$N.json" --work-dir "$OUT/work_n$N" "${EXTRA[@]}" 2>&1 | tee "$OUT/fsdp_n$N.log"
  rc=${PIPESTATUS[0]}
  echo "n=$N: rc=$rc$( [ "$rc" = 124 ] && echo ' (timed out)')$(grep -q -i 'out of memory' "$OUT/fsdp_n$N.log" && echo ' (out of memory)')" \
    | tee -a "$OUT/runs.txt"
  PORT=$((PORT + 1))
done

shopt -s nullglob
results=("$OUT"/fsdp_n*.json)
if [ ${#results[@]} -gt 0 ]; then
  "$PY" benchmarks/fsdp_scaling.py --summarize "${results[@]}" --out "$OUT/summary.json" | tee "$OUT/summary.md"
else
  echo "no size finished; see $OUT/runs.txt and the logs" >&2
  exit 1
fi
