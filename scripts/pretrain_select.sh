#!/usr/bin/env bash
# Issue 4, the fair version: choose the UNet block for each UNet by *validation* Dice, then compare the
# pretrained and the untrained UNet on test (3 subset seeds) with each one's choice.
#
# 1. extract both UNets with every output block (0-11 of `cpu-64`) at SIZE px, MiniLM text;
# 2. for each UNet and each block alone (all steps, with text; subset seed 0; 50 epochs, --dim 64 as in
#    scripts/pretrain_vs_random.sh): fit, and read the best validation Dice;
# 3. each UNet's choice = the block of highest validation Dice;
# 4. for both choices, both UNets, seeds 0/1/2: fit + evaluate on test. OUT/results.csv, OUT/table.md.
#
# Usage: [SIZE=128] [SEEDS="0 1 2"] scripts/pretrain_select.sh PRETRAINED_DIR RANDOM_DIR [OUT]
#   e.g. scripts/pretrain_select.sh runs/pvr-crop-20k/unet-pretrained runs/pvr-crop/unet-random runs/pvr-select
# (2 CPU cores: ~30 min at 128 px; everything resumes.)
set -euo pipefail
PRE=${1:?usage: scripts/pretrain_select.sh PRETRAINED_DIR RANDOM_DIR [OUT]}
RND=${2:?usage: scripts/pretrain_select.sh PRETRAINED_DIR RANDOM_DIR [OUT]}
OUT=${3:-runs/pvr-select}
DATA=${DATA:-../shared/data/MoNuSeg}
P=${PIPELINE:-pipeline}
RUNDIR="$(dirname "$0")/../train/runs/rundir.py"  # asks the run folder's owner what is done
SIZE=${SIZE:-128}; SEEDS=${SEEDS:-0 1 2}
BLOCKS=${BLOCKS:-0,1,2,3,4,5,6,7,8,9,10,11}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"

declare -A STORE CHOICE
for unet in pretrained random; do
  dir=$PRE; [ "$unet" = random ] && dir=$RND
  STORE[$unet]=$($P extract --dataset monuseg --data-root "$DATA" --size "$SIZE" --blocks "$BLOCKS" \
                 --text-encoder minilm --unet "$dir" --cache-dir "$OUT/cache" | tail -1)
  echo "block,val_dice" > "$OUT/select-$unet.csv"
  for block in ${BLOCKS//,/ }; do
    run="$OUT/select-$unet/b$block"
    python3 "$RUNDIR" finished "$run" || \
      $P fit --cache "${STORE[$unet]}" --out "$run" --epochs 50 --dim 64 --subset-seed 0 --blocks "$block" > /dev/null
    printf '%s,%.4f\n' "$block" "$(python3 "$RUNDIR" value "$run" best_val_dice)" >> "$OUT/select-$unet.csv"
  done
  CHOICE[$unet]="--blocks $(sort -t, -k2 -g -r <(tail -n +2 "$OUT/select-$unet.csv") | head -1 | cut -d, -f1)"
  echo "$unet UNet: best by validation: ${CHOICE[$unet]}"
done

echo "unet,choice_of,selection,subset_seed,val_dice,test_dice,test_iou" > "$OUT/results.csv"
for chooser in pretrained random; do
  sel=${CHOICE[$chooser]}
  for unet in pretrained random; do
    for seed in $SEEDS; do
      run="$OUT/fit-$unet-by-$chooser-$seed"
      if ! python3 "$RUNDIR" evaluated "$run" test; then
        # shellcheck disable=SC2086
        $P fit --cache "${STORE[$unet]}" --out "$run" --epochs 50 --dim 64 --subset-seed "$seed" $sel > /dev/null
        $P evaluate "$run" --no-overlays > /dev/null
      fi
      printf '%s,%s,%s,%s,%.4f,%.4f,%.4f\n' "$unet" "$chooser" "${sel// /=}" "$seed" \
        "$(python3 "$RUNDIR" value "$run" best_val_dice)" "$(python3 "$RUNDIR" value "$run" dice test)" \
        "$(python3 "$RUNDIR" value "$run" iou test)" >> "$OUT/results.csv"
    done
  done
done
python3 - "$OUT/results.csv" <<'EOF' | tee "$OUT/table.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| block (chosen by val. Dice of) | UNet | test Dice % per seed | mean test Dice % | mean val Dice % |")
print("|---|---|---|---|---|")
for chooser in ("pretrained", "random"):
    for unet in ("pretrained", "random"):
        rs = [r for r in rows if r["choice_of"] == chooser and r["unet"] == unet]
        if not rs:
            continue
        test = [100 * float(r["test_dice"]) for r in rs]
        val = [100 * float(r["val_dice"]) for r in rs]
        print(f"| `{rs[0]['selection'].replace('=', ' ')}` ({chooser}) | {unet} | "
              f"{' / '.join(f'{t:.2f}' for t in test)} | **{statistics.mean(test):.2f}** | {statistics.mean(val):.1f} |")
EOF
