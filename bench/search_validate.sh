#!/usr/bin/env bash
# Issue 25's CPU measurements: k-fold cross-validation and a hyperparameter search on real
# Fashion-MNIST (Debian's dataset-fashion-mnist package, or DATA=folder of the IDX files).
#   bash bench/search_validate.sh cv   [OUT]  # 5 folds of ResNet-18 on 1,000 training images
#   bash bench/search_validate.sh tune [OUT]  # 16 trials over lr, weight decay and label
#       smoothing on 5,000 images (val split 10 %), median pruning; killed with SIGKILL after
#       KILL_AFTER seconds and resumed by the same command; then the recipe's own settings
#       trained under the same budget for comparison (trial 0 of the study)
# OUT defaults to runs/search-validate (git-ignored: the run folders hold models).
set -euo pipefail
PART=${1:?cv or tune} OUT=${2:-runs/search-validate} DATA=${DATA:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"
{ date -u; lscpu | grep 'Model name'; echo "cores $(nproc)"; git log -1 --format='commit %h'; } \
  > "$OUT/machine-$PART.txt"
COMMON="recipe=resnet18_cpu_fmnist data.root=$DATA train.mixed_precision=fp32 train.checkpoint=false"
case "$PART" in
  cv)
    /usr/bin/time -v finetune cv $COMMON folds=5 data.train_limit=1000 data.eval_limit=2000 \
      train.epochs=15 train.batch_size=64 output_dir="$OUT/cv" 2>&1 | tee "$OUT/cv.log" ;;
  tune)
    TUNE="finetune tune $COMMON data.train_limit=5000 data.val_split=0.1 data.eval_limit=2000
      train.epochs=6 train.batch_size=128 train.checkpoint=true train.keep_checkpoints=1
      train.lr=loguniform(0.01,1) train.weight_decay=loguniform(1e-6,1e-3)
      train.label_smoothing=uniform(0,0.2) n_trials=16 pruner=median seed=0
      output_dir=$OUT/tune"
    timeout -s KILL "${KILL_AFTER:-150}" $TUNE > "$OUT/tune-killed.log" 2>&1 || true
    echo "killed after ${KILL_AFTER:-150} s; resuming" | tee -a "$OUT/tune-killed.log"
    /usr/bin/time -v $TUNE 2>&1 | tee "$OUT/tune.log" ;;
  *) echo "PART is cv or tune" >&2; exit 2 ;;
esac
