#!/bin/bash
# Every GPU path in one prepared run, for a machine with a CUDA GPU and the requirements installed:
# the training loop's speed (AMP, channels_last, with and without torch.compile) for TinyAgeNet at 112 px
# and se_resnext50_32x4d at 224 px against the GPU's matmul peak, then a short real training run three
# ways (one GPU with AMP, --multi_gpu DataParallel, torchrun DDP), each scored by val.py.
#
#     bash gpu_check.sh DATA_DIR DATASET [OUT_DIR]
#
# DATA_DIR holds DATASET_{train,valid}_align.csv as preprocessing/*.py writes them (paths inside resolved
# from there), e.g. data/utkface utkface. Figures and logs go to OUT_DIR (default gpu_check_out/); the
# last line of each bench log is bench.py's JSON. Its run time on a GPU has not been measured yet.
set -euo pipefail
DATA_DIR=${1:?usage: bash gpu_check.sh DATA_DIR DATASET [OUT_DIR]}
DATASET=${2:?usage: bash gpu_check.sh DATA_DIR DATASET [OUT_DIR]}
OUT_DIR=${3:-gpu_check_out}
PYTHON=${PYTHON:-python}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "gpu_check.sh: no CUDA GPU visible to torch" >&2; exit 1; }
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"

bench() {
    local name=$1; shift
    echo "== bench $name"
    "$PYTHON" bench.py --device cuda --data_dir "$DATA_DIR" --dataset "$DATASET" --fp32 --steps 100 --rounds 3 "$@" \
        > "$OUT_DIR/bench_$name.log" 2>&1
    tail -1 "$OUT_DIR/bench_$name.log"
}
bench tinyage112 --arch tinyage --img_size 112 --batch 256
bench tinyage112_compile --arch tinyage --img_size 112 --batch 256 TRAIN.COMPILE True
bench seresnext224 --arch se_resnext50_32x4d --img_size 224 --batch 64
bench seresnext224_compile --arch se_resnext50_32x4d --img_size 224 --batch 64 TRAIN.COMPILE True

TRAIN_ARGS=(--data_dir "$DATA_DIR" --dataset "$DATASET" --aug MODEL.ARCH tinyage MODEL.IMG_SIZE 96
            TRAIN.EPOCHS 3 TRAIN.BATCH_SIZE 128 TRAIN.SCHEDULER cosine TRAIN.OPT adamw TRAIN.LR 0.002)
train_and_score() {
    local name=$1; shift
    echo "== train $name"
    rm -rf "$OUT_DIR/run_$name"
    /usr/bin/time -f "$name: %e s" "$@" --checkpoint "$OUT_DIR/run_$name" > "$OUT_DIR/train_$name.log" 2>&1
    "$PYTHON" val.py --data_dir "$DATA_DIR" --dataset "$DATASET" --resume "$OUT_DIR/run_$name/best.pth" \
        --output_dir "$OUT_DIR/val_$name" > "$OUT_DIR/val_$name.log" 2>&1
    "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'MAE', round(r['mae'], 3))" \
        "$OUT_DIR/val_$name/report.json" "$name"
}
train_and_score amp "$PYTHON" train-ldl.py "${TRAIN_ARGS[@]}"
if [ "$GPUS" -ge 2 ]; then
    train_and_score dataparallel "$PYTHON" train-ldl.py --multi_gpu "${TRAIN_ARGS[@]}"
    train_and_score ddp "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" train-ldl.py \
        "${TRAIN_ARGS[@]}" TRAIN.SYNC_BN True
else
    echo "one GPU: --multi_gpu and DDP run as single-GPU paths (DDP with one process)"
    train_and_score dataparallel "$PYTHON" train-ldl.py --multi_gpu "${TRAIN_ARGS[@]}"
    train_and_score ddp "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 train-ldl.py \
        "${TRAIN_ARGS[@]}"
fi
echo "== done: $OUT_DIR"
