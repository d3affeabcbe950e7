#!/usr/bin/env bash
# Issue 15's measurements on a host with 2 GPUs, in one go (docs/BENCHMARKS.md, "Quality vs the
# authors' code"): the CUDA selection test, then the whole variant table with point 20 on GPU 0
# and point 50 on GPU 1 (one process per GPU, so every pruning time is a GPU to itself), then
# heal on each point's default. Results are JSON lines written as they come, so a run stopped
# at its time limit still leaves every finished row.
#
#   PYTHONPATH=$PWD bash benchmarks/issue15_h200.sh SmolLM2-135M-Instruct.Q4_1.gguf DATA_DIR OUT
#
# DATA_DIR holds calib.txt and eval.txt (../shared/data). Budgets: QUALITY_S and HEAL_S seconds.
set -u
GGUF=$1 DATA=$2 OUT=$3
QUALITY_S=${QUALITY_S:-370} HEAL_S=${HEAL_S:-120}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# Most wanted first: a row that a time limit cuts off is one of the last ones.
ALL="authors default free+authors-plan free+authors-heads free+authors-groups
free+authors-calib free+damp0 authors-damp ours-balanced ours-group free-linear free-uniform
balanced-uniform free-dense free-swap free-alloc free-dense-swap free-dense-alloc
free-dense-swap-alloc calib-128 calib-256 calib-512 free-damp1e-3 free-dense-alloc-256
free-dense-alloc-512 free-dense-alloc-damp1e-3-512 free-seed1 free-seed2 no-compensation
magnitude"
# A second call may finish a cut-off run: OUT already holding q<point>.jsonl (rows are never
# repeated: the authors' size is read back from it), fewer variants, heal where not done.
VARIANTS20=${VARIANTS20:-$ALL} VARIANTS50=${VARIANTS50:-$ALL} HEAL=${HEAL:-"20 50"}

timeout 60 $PY -m pytest -q -p no:cacheprovider -m gpu tests/core/test_pruner.py \
    tests/core/test_hessian.py > "$OUT/pytest_gpu.txt" 2>&1
echo "gpu tests: rc=$?"

point() {  # POINT GPU VARIANTS
    CUDA_VISIBLE_DEVICES=$2 timeout "$QUALITY_S" $PY benchmarks/quality_smollm2.py \
        --device cuda --gguf "$GGUF" --data "$DATA" --points "$1" --nsamples 64 --seqlen 512 \
        --eval-windows 200 --out "$OUT/q$1.jsonl" --variants $3 > "$OUT/log$1.txt" 2>&1
    echo "point $1 table: rc=$?"
    case " $HEAL " in *" $1 "*) ;; *) return ;; esac
    CUDA_VISIBLE_DEVICES=$2 timeout "$HEAL_S" $PY benchmarks/gpu_quality.py --gguf "$GGUF" \
        --data "$DATA" --sizes-from "$OUT/q$1.jsonl" --calib-windows --heal-time-factors 1 5 \
        --eval-windows 200 --out "$OUT/heal$1.jsonl" >> "$OUT/log$1.txt" 2>&1
    echo "point $1 heal: rc=$?"
}
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    point 20 0 "$VARIANTS20" &
    point 50 1 "$VARIANTS50" &
    wait
else  # one GPU: one after the other, so that the timings stay a GPU's own
    point 50 0 "$VARIANTS50"
    point 20 0 "$VARIANTS20"
fi
