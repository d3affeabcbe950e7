#!/usr/bin/env bash
# What allocation="sensitivity" and target="dense" cost at 7B-class size (issue 15, issue 2's
# 60 s target): random bf16 weights, 20%, 128 x 2048 calibration, resident on one GPU each,
# beside the default in the same call. Usage: benchmarks/issue15_7b_cost.sh OUTDIR [DEADLINE_S]
#   GPU 0: 8b default, 7b default, 7b target=dense, 8b target=dense (as time allows)
#   GPU 1: 8b allocation=sensitivity + target=dense, then 8b allocation alone
# Allocation needs grouped-query attention (it keeps every KV head), so the GQA Llama-3-8B shape
# stands in for 7B there; the LLaMA-7B shape (multi-head) shows the default and the dense target.
# CPU check of the script: SHAPES="tiny-gqa tiny" ARGS="--device cpu --nsamples 4 --seqlen 128"
set -uo pipefail
OUT=${1:?outdir}; DEADLINE=${2:-225}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
read -r GQA MHA <<< "${SHAPES:-8b 7b}"
R=$OUT/results.jsonl
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
# One run on one GPU, given what is left of the deadline; a run cut short leaves a line saying so.
run() {
  local gpu=$1 label=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then echo "{\"label\": \"$label\", \"skipped\": \"no time left\"}" >> "$R"; return; fi
  CUDA_VISIBLE_DEVICES=$gpu timeout "$left" python3 benchmarks/prune_speed.py --placement resident \
    --label "$label" --out "$R" ${ARGS:-} "$@" >> "$OUT/gpu$gpu.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || echo "{\"label\": \"$label\", \"failed_rc\": $rc, \"after_s\": $SECONDS}" >> "$R"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
lane0() {
  run 0 "$GQA-default" --shape "$GQA"
  run 0 "$MHA-default" --shape "$MHA"
  run 0 "$MHA-dense" --shape "$MHA" --target dense
  run 0 "$GQA-dense" --shape "$GQA" --target dense
}
lane1() {
  local gpu=$(( NGPU >= 2 ? 1 : 0 ))
  run "$gpu" "$GQA-alloc-dense" --shape "$GQA" --allocation sensitivity --target dense
  run "$gpu" "$GQA-alloc" --shape "$GQA" --allocation sensitivity
}
if [ "$NGPU" -ge 2 ]; then lane0 & lane1; wait; else lane1; lane0; fi
echo "== results"; cat "$R"
for f in "$OUT"/gpu*.log; do echo "== $f"; grep -v '^{' "$f" | tail -5; done
