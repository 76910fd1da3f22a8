#!/usr/bin/env bash
# Issue 25's multi-label measurements on real pixels: 2x2 mosaics of Fashion-MNIST (56 px, the
# tags are the classes present; bench/mosaics.py) trained from scratch on this CPU.
#   bash bench/multilabel.sh folder [OUT]  # labels.csv folder: 4,000 train (10 % validation,
#       where the thresholds are tuned), 1,000 test; evaluate at the tuned thresholds and at 0.5
#   bash bench/multilabel.sh hf [OUT]      # the same kind of data as a save_to_disk dataset with
#       a Sequence(ClassLabel) column (1,000 train, 500 test): trains, evaluates and predicts
# OUT defaults to runs/multilabel (git-ignored: the run folders hold models).
set -euo pipefail
PART=${1:?folder or hf} OUT=${2:-runs/multilabel}
mkdir -p "$OUT"
{ date -u; lscpu | grep 'Model name'; echo "cores $(nproc)"; git log -1 --format='commit %h'; } \
  > "$OUT/machine-$PART.txt"
COMMON="recipe=resnet18_cpu_fmnist data.image_size=56 train.mixed_precision=fp32
  train.checkpoint=false train.label_smoothing=0 data.val_split=0.1"
case "$PART" in
  folder)
    python bench/mosaics.py --out "$OUT/mosaics" --force | tee "$OUT/mosaics.log"
    /usr/bin/time -v finetune train $COMMON data.root="$OUT/mosaics" train.epochs=8 \
      train.batch_size=128 output_dir="$OUT/folder-run" 2>&1 | tee "$OUT/folder-train.log"
    finetune evaluate "$OUT/folder-run" 2>&1 | tee "$OUT/folder-evaluate.log" ;;
  hf)
    python bench/mosaics.py --out "$OUT/mosaics-hf" --format hf --train 1000 --test 500 --force \
      | tee "$OUT/mosaics-hf.log"
    finetune train $COMMON data.source=hf data.root="$OUT/mosaics-hf" train.epochs=4 \
      train.batch_size=64 output_dir="$OUT/hf-run" 2>&1 | tee "$OUT/hf-train.log"
    finetune evaluate "$OUT/hf-run" 2>&1 | tee "$OUT/hf-evaluate.log"
    finetune predict "$OUT/hf-run" "$OUT/mosaics-hf" --split 'test[:5]' --json \
      2>&1 | tee "$OUT/hf-predict.log" ;;
  *) echo "PART is folder or hf" >&2; exit 2 ;;
esac
