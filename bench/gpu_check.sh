#!/usr/bin/env bash
# Every GPU figure in README.md and BENCHMARKS.md re-measured in one call of under 8 minutes on
# one GPU, ending in one table (bench/gpu_table.py):
#   bash bench/gpu_check.sh          # data in .data/fashion-mnist; omegaconf wheels in .whl
#   DRY=1 bash bench/gpu_check.sh    # the same steps, tiny, on a CPU: checks the script itself
# 1. resnet18_fast_fmnist over seeds 0, 1, 2 (time to 90/93/94 %);
# 2. ResNet-18 at 224 px, batch 256: training images/s, lecture loop against finetune's
#    (fp32, bf16, bf16 + torch.compile);
# 3. photos: 1,000 camera-sized JPEGs, ResNet-50 at 224 px, bf16, streamed from the files by
#    DataLoader workers against decoded once and held on the GPU (bench/photos.py);
# 4. resnet18_long_fmnist, seed 0, in whatever is left of $BUDGET seconds.
# Results land in $OUT (default /tmp/bench_out): machine.txt, gpu_check.txt (the log), the
# JSON of each step and table.md.
set -uo pipefail
BUDGET=${BUDGET:-470} LOG=gpu_check.txt
source bench/setup_device.sh
if [ "${DRY:-0}" = 1 ]; then  # every step at toy size, CPU-friendly
  SMALL="data.train_limit=512 train.epochs=1 train.compile=false"
  LOOP="--image-size 32 --batch-size 32 --steps 2 --warmup 1 --variants fp32"
  PHOTOS="--images 24"; PHOTO_RUN="--image-size 64 --batch-size 4 --steps 2 --workers 2 --precision fp32"
else
  SMALL="" LOOP="--image-size 224 --batch-size 256 --steps 30 --variants fp32,bf16,bf16+compile"
  PHOTOS="--images 1000"
  PHOTO_RUN="--image-size 224 --batch-size 128 --steps 20 --workers $(( $(nproc) - 2 )) --precision bf16"
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, torchvision, accelerate, timm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__, 'timm', timm.__version__)"
  echo "cores $(nproc)"; git log -1 --format='commit %h %s' 2>/dev/null; } 2>&1 | tee "$OUT/machine.txt"

step timeout 200 python3 bench/time_to_accuracy.py recipe=resnet18_fast_fmnist data.root=$DATA \
  $SMALL --seeds 0,1,2 --targets 0.90,0.93,0.94 --out /tmp/gpu_check/fast \
  --json "$OUT/tta_fast.json"
rm -f "$OUT/loop_speed.jsonl"
step timeout 120 python3 bench/loop_speed.py --model resnet18 $LOOP --data-root $DATA \
  --json "$OUT/loop_speed.jsonl"
step timeout 60 python3 bench/photos.py make /tmp/gpu_check/photos $PHOTOS
step timeout 150 python3 bench/photos.py run /tmp/gpu_check/photos --model resnet50 $PHOTO_RUN \
  --sides stream,device --json "$OUT/photos.json"
step timeout $((BUDGET - SECONDS)) python3 bench/time_to_accuracy.py \
  recipe=resnet18_long_fmnist data.root=$DATA $SMALL --seeds 0 --targets 0.94,0.95,0.955 \
  --out /tmp/gpu_check/long --json "$OUT/tta_long.json"
python3 bench/gpu_table.py "$OUT" | tee "$OUT/table.md"
echo "### done at $SECONDS s"
