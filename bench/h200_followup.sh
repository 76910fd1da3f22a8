#!/usr/bin/env bash
# Second H200 call: the fast recipe with CUDA graphs, and profiles of where a step's time goes
# at 64 and 224 px (see BENCHMARKS.md). Same set-up as bench/gpu_check.sh.
set -uo pipefail
BUDGET=${BUDGET:-270} LOG=log2.txt
source bench/setup_device.sh
step timeout $((BUDGET - 100)) python3 bench/time_to_accuracy.py recipe=resnet18_fast_fmnist \
  data.root=$DATA train.compile_mode=reduce-overhead train.epochs=14 --seeds 0,1,2 \
  --targets 0.90,0.93,0.94 --out /tmp/runs_fast2 --json "$OUT/tta_fast2.json"
for s in 0 1 2; do cp /tmp/runs_fast2/seed$s/metrics.jsonl "$OUT/fast2_seed$s.jsonl" 2>/dev/null; done
step timeout 40 python3 bench/loop_speed.py --model resnet18 --image-size 224 \
  --batch-size 256 --steps 20 --variants bf16 --profile --data-root $DATA \
  --json "$OUT/loop_speed2.jsonl"
step timeout $((BUDGET - SECONDS)) python3 bench/loop_speed.py --model resnet18 --image-size 64 \
  --batch-size 512 --steps 20 --variants bf16,bf16+compile+cudagraphs --profile \
  --data-root $DATA --json "$OUT/loop_speed2.jsonl"
echo "### done at $SECONDS s"
