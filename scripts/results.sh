#!/usr/bin/env bash
# The paper's protocol on real data (issue 7): TextDiff, no text (ζ1), concat fusion (ζ2) and the plain
# U-Net baseline, each on the same 3 random few-shot training subsets; test Dice / IoU, mean ± std.
# Encoders that run anywhere: a `pipeline pretrain` domain UNet (trained on the dataset's unlabelled
# training images) and MiniLM for the text.
#
# Usage: [SIZE=128] [EPOCHS=100] [SEEDS="0 1 2"] [FLAGS=cpu-64] [BLOCKS=4,6,8] [DIM=768] [AUGMENT=d4]
#        [PRETRAIN_ITER=5000] [UNET=folder|checkpoint|name] [TEXT=minilm] [WIDTH=64] [SWEEP= (empty: no Fig. 3 sweep)]
#        [SCHEDULER=local:N|tcp://HOST:PORT (the sweep's fits as dask tasks)]
#        [METHODS="textdiff notext concat unet"] [DROPOUT="0.25 0.5"] [DROPOUT_CLASSIFIERS="shared (and/or own)"]
#        [TEXT_MODES="none shuffled mirrored"]
#        [VIEW_TEXT="rewrite unchanged" (with AUGMENT=d4: TextDiff with each other view-text policy, validation only)]
#        scripts/results.sh monuseg|qata [OUT]
# Without UNET, a domain UNet is pretrained into OUT/unet-pretrained first; with it (e.g. UNET=adm-imagenet-256
# TEXT=bioclinicalbert SIZE=256 BLOCKS=6,8,12,16 DIM=768: the paper's encoders), that UNet is used as it is.
# Writes OUT/<method>-<seed>/ run folders (each with eval-test/), OUT/textdrop<P>-<seed>/ (TextDiff fitted with
# --text-dropout P, for each P in DROPOUT; OUT/textdrop<P>own-<seed> with --dropout-classifier own when
# DROPOUT_CLASSIFIERS has own), each text-reading run also scored with every --text mode in TEXT_MODES
# (eval-test-text-<mode>/: how much it relies on its text), OUT/view<policy>-<seed>/ (fit --view-text policy; fitted
# and validated, never scored on test: the policy is chosen on validation), OUT/sweep/ (Fig. 3, monuseg) and OUT/table.md
# (scripts/results_table.py). Everything resumes: re-running skips finished work.
set -euo pipefail
DATASET=${1:?usage: scripts/results.sh monuseg|qata [OUT]}
OUT=${2:-runs/results/$DATASET}
case $DATASET in
  monuseg) DATA=${DATA:-../shared/data/MoNuSeg} ;;
  qata) DATA=${DATA:-../shared/data/QaTa-COV19} ;;
  *) echo "unknown dataset $DATASET (monuseg or qata)" >&2; exit 2 ;;
esac
P=${PIPELINE:-pipeline}
SIZE=${SIZE:-128}; EPOCHS=${EPOCHS:-100}; SEEDS=${SEEDS:-0 1 2}; FLAGS=${FLAGS:-cpu-64}
BLOCKS=${BLOCKS:-4,6,8}; DIM=${DIM:-768}; AUGMENT=${AUGMENT:-d4}; WIDTH=${WIDTH:-64}
TEXT=${TEXT:-minilm}
METHODS=${METHODS:-textdiff notext concat unet}; DROPOUT=${DROPOUT-0.25 0.5}; TEXT_MODES=${TEXT_MODES-none shuffled mirrored}
DROPOUT_CLASSIFIERS=${DROPOUT_CLASSIFIERS:-shared}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if [ -z "${UNET:-}" ]; then
  UNET=$OUT/unet-pretrained
  # samples.png is written once the last iteration is (model.pt is also an interrupted run's checkpoint)
  [ -f "$UNET/samples.png" ] || $P pretrain --dataset "$DATASET" --data-root "$DATA" --size "$SIZE" --crop 64 --flags "$FLAGS" --batch-size 8 \
     --iterations "${PRETRAIN_ITER:-5000}" --out "$UNET" --resume
fi
store=$($P extract --dataset "$DATASET" --data-root "$DATA" --size "$SIZE" --unet "$UNET" --text-encoder "$TEXT" \
        --blocks "$BLOCKS" --augment "$AUGMENT" --cache-dir "$OUT/cache" | tail -1)

rundir() { python3 "$(dirname "$0")/../train/runs/rundir.py" "$@"; }
done_run() { rundir evaluated "$1" test ${2:+"$2"}; }  # fit done, test scored (with text mode $2)
for seed in $SEEDS; do
  common=(--cache "$store" --subset-seed "$seed" --epochs "$EPOCHS")
  runs=()  # this subset's runs that read text: scored again under each text mode
  for method in $METHODS $(for p in $DROPOUT; do for c in $DROPOUT_CLASSIFIERS; do echo "textdrop$p${c#shared}"; done; done); do
    run="$OUT/$method-$seed"
    case $method in
      textdiff) fit=(fit --dim "$DIM"); runs+=("$run") ;;
      notext) fit=(fit --dim "$DIM" --no-text) ;;
      concat) fit=(fit --dim "$DIM" --fusion concat) ;;
      unet) fit=(baseline --width "$WIDTH") ;;
      textdrop*own) p=${method#textdrop}
                    fit=(fit --dim "$DIM" --text-dropout "${p%own}" --dropout-classifier own); runs+=("$run") ;;
      textdrop*) fit=(fit --dim "$DIM" --text-dropout "${method#textdrop}" --dropout-classifier shared); runs+=("$run") ;;
      *) echo "unknown method $method (textdiff, notext, concat, unet)" >&2; exit 2 ;;
    esac
    done_run "$run" && continue
    rundir finished "$run" || $P "${fit[@]}" "${common[@]}" --out "$run" > /dev/null  # a finished fit is kept
    $P evaluate "$run" > /dev/null
  done
  for run in "${runs[@]}"; do
    for mode in $TEXT_MODES; do
      done_run "$run" "$mode" || $P evaluate "$run" --text "$mode" --no-overlays > /dev/null
    done
  done
  for policy in ${VIEW_TEXT:-}; do
    run="$OUT/view$policy-$seed"
    rundir finished "$run" || $P fit "${common[@]}" --dim "$DIM" --view-text "$policy" --out "$run" > /dev/null
  done
done
if [ "$DATASET" = monuseg ] && [ -n "${SWEEP-1}" ]; then   # Fig. 3: each block, step and pair alone, ± text
  $P sweep --cache "$store" --out "$OUT/sweep" --epochs "$EPOCHS" --dim "$DIM" --grid \
    ${SCHEDULER:+--scheduler "$SCHEDULER"} > /dev/null
fi
python3 "$(dirname "$0")/results_table.py" "$OUT" --dataset "$DATASET" | tee "$OUT/table.md"
