#!/usr/bin/env bash
# The scale benchmarks on an H200 host, each beside the floor of the same machine (device runs;
# docs/BENCHMARKS.md records the figures). Usage: benchmarks/scale_suite.sh PART OUTDIR
#   part 1: floor, 7B resident/offloaded/disk (+ 2 GPUs), 70B generated on 1 and 2 GPUs
#   part 2: Llama-3-8B resident/offloaded/disk, 13B streamed from disk
#   part 3 (2 GPUs): a rank killed mid-job under NCCL (fail fast, resume), then the whole 80-layer
#           Llama-3-70B shape on 2 GPUs through the library's launcher (the worker's path)
#   part 4 (2 GPUs): the whole 80-layer 70B shape on GPU 0 while GPU 1 writes a 13B checkpoint
#           and streams it from disk (host-memory peak); the two share the host (stated in the doc)
set -uo pipefail
PART=${1:?part}; OUT=${2:?outdir}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/results.jsonl
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
run1() { CUDA_VISIBLE_DEVICES=0 timeout "$1" python3 benchmarks/prune_speed.py "${@:2}" --out "$R"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(page cache not dropped)"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
free -g | head -2; df -h /tmp | tail -1
if [ "$PART" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_floor.py | tee "$OUT/floor.jsonl"
  run1 150 --shape 7b --placement resident --label 7b-resident
  run1 150 --shape 7b --placement host --label 7b-offloaded
  run1 120 --shape 7b --write /tmp/m7
  drop_caches
  run1 150 --placement disk --model /tmp/m7 --label 7b-disk
  run1 120 --shape 70b --placement generated --stop-after 6 --label 70b-1gpu
  if [ "$NGPU" -ge 2 ]; then
    timeout 120 python3 benchmarks/prune_speed.py --shape 70b --placement generated --stop-after 6 --gpus 2 --label 70b-2gpu --out "$R"
    timeout 120 python3 benchmarks/prune_speed.py --placement disk --model /tmp/m7 --gpus 2 --label 7b-disk-2gpu --out "$R"
  fi
  run1 100 --shape 7b --placement host --no-prefetch --stop-after 12 --label 7b-offloaded-noprefetch-12layers
fi
if [ "$PART" = 2 ]; then
  run1 150 --shape 8b --placement resident --label 8b-resident
  run1 150 --shape 8b --placement host --label 8b-offloaded
  run1 120 --shape 8b --write /tmp/m8
  drop_caches
  run1 150 --placement disk --model /tmp/m8 --label 8b-disk
  rm -rf /tmp/m8 /tmp/m7
  run1 150 --shape 13b --write /tmp/m13
  drop_caches
  run1 200 --placement disk --model /tmp/m13 --label 13b-disk
fi
if [ "$PART" = 3 ]; then
  timeout 100 python3 benchmarks/rank_death.py --out "$R" 2>&1 | grep -v "^\[rank" | tail -8
  timeout "${T70:-480}" python3 benchmarks/prune_speed.py --shape 70b --placement generated --gpus 2 \
    --label 70b-2gpu-80layers --trace "$OUT/trace.jsonl" --out "$R"
fi
if [ "$PART" = 4 ]; then
  ( CUDA_VISIBLE_DEVICES=1 timeout 300 python3 benchmarks/prune_speed.py --shape 13b --write /tmp/m13 --out "$R" \
    && drop_caches && CUDA_VISIBLE_DEVICES=1 timeout 150 python3 benchmarks/prune_speed.py --placement disk \
    --model /tmp/m13 --label 13b-disk-rss --out "$R"; rm -rf /tmp/m13 ) > "$OUT/13b.log" 2>&1 &
  run1 "${T70:-540}" --shape 70b --placement generated --label 70b-1gpu-80layers --trace "$OUT/trace.jsonl"
  wait
fi
echo "== results"; cat "$R"
