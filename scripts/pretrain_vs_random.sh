#!/usr/bin/env bash
# Does diffusion pretraining on MoNuSeg's unlabelled training images give better features than the
# untrained UNet of the same flags? Same extraction, same fits (3 subset seeds), test Dice.
# Usage: [SIZE=64] [CROP=] [SEEDS="0 1 2"] scripts/pretrain_vs_random.sh [ITERATIONS] [OUT]
#        (CROP=64: pretrain on random 64 px windows of the SIZE px images; extraction stays at SIZE)
#        (writes OUT/results.csv; ~30 min on 2 CPU cores at size 64, about 4x that at 128)
set -euo pipefail
ITER=${1:-1000}
OUT=${2:-runs/pretrain-vs-random}
DATA=${DATA:-../shared/data/MoNuSeg}
P=${PIPELINE:-pipeline}
SIZE=${SIZE:-64}
SEEDS=${SEEDS:-0 1 2}
CROP=${CROP:-}
export HF_HUB_OFFLINE=1
RUNDIR="$(dirname "$0")/../train/runs/rundir.py"  # asks the run folder's owner what is written
common=(--dataset monuseg --data-root "$DATA" --size "$SIZE" --flags cpu-64 --batch-size 8)
$P pretrain "${common[@]}" ${CROP:+--crop "$CROP"} --iterations "$ITER" --out "$OUT/unet-pretrained" --resume
$P pretrain "${common[@]}" --iterations 0 --out "$OUT/unet-random" --resume   # the initial weights, untrained
echo "unet,subset_seed,test_dice,test_iou" > "$OUT/results.csv"
for unet in pretrained random; do
  store=$($P extract --dataset monuseg --data-root "$DATA" --size "$SIZE" --blocks 4,6,8 --text-encoder minilm \
          --unet "$OUT/unet-$unet" --cache-dir "$OUT/cache" | tail -1)
  for seed in $SEEDS; do
    run="$OUT/fit-$unet-$seed"
    $P fit --cache "$store" --out "$run" --epochs 50 --dim 64 --subset-seed "$seed" > /dev/null
    $P evaluate "$run" --no-overlays > /dev/null
    printf '%s,%s,%.4f,%.4f\n' "$unet" "$seed" "$(python3 "$RUNDIR" value "$run" dice test)" \
      "$(python3 "$RUNDIR" value "$run" iou test)" >> "$OUT/results.csv"
  done
done
cat "$OUT/results.csv"
