#!/usr/bin/env bash
# Every GPU number in BENCHMARKS.md, in one call of a lent GPU machine (see BENCHMARKS.md):
#   bash bench/h200.sh        # data in .data/fashion-mnist; omegaconf wheels in .whl if missing
# Results land in $OUT (default /tmp/bench_out): machine.txt, log.txt, loop_speed.jsonl,
# tta_fast.json, tta_long.json, long_metrics.jsonl.
set -uo pipefail
BUDGET=${BUDGET:-570}
source bench/setup_device.sh
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, torchvision, accelerate, timm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__, 'timm', timm.__version__)"
  nproc; } 2>&1 | tee "$OUT/machine.txt"

step python3 bench/time_to_accuracy.py recipe=resnet18_fast_fmnist data.root=$DATA \
  --seeds 0,1,2 --targets 0.90,0.93,0.94 --out /tmp/runs_fast --json "$OUT/tta_fast.json"
for model in resnet18 alexnet_lecture; do
  step python3 bench/loop_speed.py --model $model --image-size 224 --batch-size 256 \
    --steps 40 --variants fp32,bf16,bf16+compile --data-root $DATA --json "$OUT/loop_speed.jsonl"
done
step python3 bench/loop_speed.py --model resnet18 --image-size 64 --batch-size 512 \
  --steps 40 --variants bf16 --data-root $DATA --json "$OUT/loop_speed.jsonl"
step timeout $((BUDGET - SECONDS)) python3 bench/time_to_accuracy.py \
  recipe=resnet18_long_fmnist data.root=$DATA --seeds 0 --targets 0.94,0.95,0.955 \
  --out /tmp/runs_long --json "$OUT/tta_long.json"
cp /tmp/runs_long/seed0/metrics.jsonl "$OUT/long_metrics.jsonl" 2>/dev/null
echo "### done at $SECONDS s"
