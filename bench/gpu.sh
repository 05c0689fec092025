#!/usr/bin/env bash
# The GPU check: one run on a lent NVIDIA H100/H200, within a time budget, that writes JSON records.
#
#   bash bench/gpu.sh [--dry-run] [OUTPUT_DIR]      (default OUTPUT_DIR: bench/results/gpu)
#
# The machine is bare and offline with JAX (CUDA), flax, orbax, tokenizers, safetensors and
# transformers: this script installs nothing and runs the working tree from PYTHONPATH. Random
# weights, bfloat16. In order of what matters most, each step under what is left of the budget
# (GPU_BUDGET_S, default 480 s; a step that would start with under 30 s left is skipped):
#   1. parity   tiny model: greedy tokens on the GPU identical to the host CPU's (float32), and
#               bf16 logits within tolerance of float32 (bench/gpu_check.py parity)
#   2. generate Phi-4-mini, XLA attention: decode MBU at batch 1/16/64, prefill MFU at 2048/8192
#   3. generate Phi-4-mini, cuDNN attention: the same prefills and batch-1 decode (the A/B of step 2)
#   4. generate phi-4 (default attention, cuDNN): decode at batch 1/16/64, prefill at 2048/8192
#   5. int8     Phi-4-mini and phi-4, batch-1 decode with bf16 and then int8 weights (weight-only,
#               --quantize int8): the speed-up and MBU on the int8 bytes, in one run
#   6. memory   Phi-4-mini 32K prefill: the device's peak bytes against the planner's figure
# Records: OUTPUT_DIR/generate.jsonl (bench/generate.py's), gpu_check.jsonl, and steps.jsonl (each
# step's exit code and seconds, or why it was skipped).
#
# --dry-run: the same steps on tiny presets, float32 and XLA attention, at small lengths, on any
# backend (tests/test_bench.py runs it on the CPU so that it works the first time it meets a GPU);
# step 3 is left out there (without cuDNN it would be step 2 again).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-$ROOT/bench/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_BUDGET_S:-480}"
DEADLINE=$(( $(date +%s) + BUDGET ))

if [ "$DRY" = 1 ]; then
  MINI=tiny; BIG=tiny-phi-4; DTYPE=float32
  BATCH="1 2"; PREFILL=16; NEW=6; MEMORY_CONTEXT=512; REPEATS=1; PEAKS="--read-buffer-mb 64 --matmul-sizes 256 512"
  INT8_MODELS="$MINI"
else
  MINI=phi-4-mini; BIG=phi-4; DTYPE=bfloat16
  BATCH="1 16 64"; PREFILL="2048 8192"; NEW=32; MEMORY_CONTEXT=32k; REPEATS=2; PEAKS=""
  INT8_MODELS="$MINI $BIG"
fi

FAILED=0
step() {  # step NAME COMMAND...: runs it under what is left of the budget, and records how it went
  local name="$1"; shift
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 30 ]; then
    echo "{\"step\": \"$name\", \"skipped\": \"the budget of $BUDGET s was spent\"}" >> "$OUT/steps.jsonl"
    echo "gpu.sh: $name skipped (budget spent)" >&2
    return
  fi
  echo "gpu.sh: $name (up to $left s) ..." >&2
  local start rc
  start=$(date +%s)
  timeout "$left" "$@"
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/steps.jsonl"
  if [ "$rc" -ne 0 ]; then FAILED=1; echo "gpu.sh: $name failed (exit $rc)" >&2; fi
}

GEN=("$PY" "$ROOT/bench/generate.py" --dtype "$DTYPE" --new-tokens "$NEW" --repeats "$REPEATS"
     --output "$OUT/generate.jsonl")
CHECK=("$PY" "$ROOT/bench/gpu_check.py" --output "$OUT/gpu_check.jsonl")
# shellcheck disable=SC2086  # the lists split into their words
{
  step parity "${CHECK[@]}" parity
  step generate-mini-xla "${GEN[@]}" --model "$MINI" --attention xla --parts prefill decode \
    --batch $BATCH --prefill-len $PREFILL $PEAKS
  if [ "$DRY" = 0 ]; then  # (a dry run has no cuDNN: the step would repeat the one above)
    step generate-mini-cudnn "${GEN[@]}" --model "$MINI" --attention cudnn --parts prefill decode \
      --batch 1 --prefill-len $PREFILL $PEAKS
  fi
  step generate-big "${GEN[@]}" --model "$BIG" --parts prefill decode --batch $BATCH --prefill-len $PREFILL $PEAKS
  step int8 "${GEN[@]}" --model $INT8_MODELS --quantize none int8 --parts decode --batch 1 $PEAKS
  step memory "${CHECK[@]}" memory --model "$MINI" --context "$MEMORY_CONTEXT" --dtype "$DTYPE"
}
echo "gpu.sh: records in $OUT" >&2
exit "$FAILED"
