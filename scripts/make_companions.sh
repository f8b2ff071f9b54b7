#!/usr/bin/env bash
# The files that ship beside the default model, made for a model file MODEL (e.g. the 2-hour recipe's
# RUNS/shapes64-2h-eps-minsnr-dec5000.safetensors; MODEL_CARD.md, "Tuned schedules", "The tiny decoder",
# "Few steps"). They are written into RUNS_DIR/ship beside a copy of MODEL, under the names
# latentforge/data uses, so that `cp RUNS_DIR/ship/* latentforge/data/` puts the whole set in place:
#   shapes64.safetensors                 MODEL itself
#   shapes64.schedule-euler-{8,4}.json   σ schedules tuned to it (euler, CFG 3; `--scheduler tuned`)
#   shapes64.taesd_decoder.safetensors   the tiny preview decoder distilled from its VAE
#   shapes64-fast.safetensors            the 4-step student: reflow pairs from 8 tuned euler steps at CFG 3,
#                                        a rectified flow whatever MODEL's objective (training/reflow.py)
#   shapes64.json                        the evaluator's tables and the speed (benchmarks/default_model.py)
# and shapes64-fast.json (the student's 4-step table) once it is in place: `INSTALL=1` copies the set into
# latentforge/data and evaluates default-fast there (the slow tests read both JSON files).
# Usage: [PY=.venv/bin/python] [INSTALL=1] scripts/make_companions.sh MODEL RUNS_DIR
# Each stage leaves RUNS_DIR/<stage>.done with its wall time; run again to continue after a stop.
set -euo pipefail
MODEL=${1:?usage: scripts/make_companions.sh MODEL RUNS_DIR}
R=${2:?usage: scripts/make_companions.sh MODEL RUNS_DIR}
PY=${PY:-python}
LF="$PY -m latentforge"
HERE=$(cd "$(dirname "$0")" && pwd)
[ -f "$MODEL" ] || { echo "MODEL must be a model file, got '$MODEL'" >&2; exit 2; }
S=$R/ship
M=$S/shapes64.safetensors
mkdir -p "$S"
# shellcheck source=stages.sh
source "$HERE/stages.sh"  # timed, train_into

copy_model() { cp "$MODEL" "$M.tmp" && mv "$M.tmp" "$M"; }
timed model copy_model

# the evaluator's tables (validation and held out at 20, 8 and 4 steps) and the speed, first: the speed is
# measured on an idle machine, and the tables say whether the rest is worth making
timed card $PY "$HERE/../benchmarks/default_model.py" --model "$M" --json "$S/shapes64.json" --out "$R/card"

# σ schedules minimising euler's error against a 256-step Heun solution on 32 prompts (Align Your Steps-style)
timed schedule8 $LF tune-schedule --model "$M" --steps 8 --sampler euler --cfg 3
timed schedule4 $LF tune-schedule --model "$M" --steps 4 --sampler euler --cfg 3

# the tiny decoder: 4096 scenes' posterior means in, the full decoder's images out, 2000 steps
timed taesd $PY "$HERE/train_tiny_decoder.py" --model "$M" --n 4096 --n-eval 256 --steps 2000 --seed 0 \
    --json "$R/taesd.json"

# the student: 30,000 (noise, sample) pairs of 8 tuned euler steps at CFG 3 (the training split's prompts),
# then 3000 steps of batch 64 on their straight lines, text tower frozen, from MODEL's weights
timed pairs $LF reflow-pairs --model "$M" --out "$R/pairs" --n 30000 --steps 8 --sampler euler \
    --scheduler tuned --cfg 3 --seed 3 --batch 64
timed student train_into "$R/student" $LF train denoiser --preset shapes64 --unet.mask_text_padding true \
    --init_from "$M" --data "$R/pairs" --caption_dropout 0 --train_text_encoder false --lr 2e-4 \
    --lr_schedule cosine --min_lr_ratio 0.1 --warmup_steps 50 --ema_decay 0.995 --max_steps 3000 \
    --checkpoint_every 500 --seed 9
timed fast $PY "$HERE/ship_fast_model.py" "$R/student/checkpoints/last.safetensors" --model "$M" \
    --dtype float16 --steps 4 --sampler euler --scheduler sgm_uniform --cfg 1 --out "$S/shapes64-fast.safetensors"

if [ "${INSTALL:-0}" = 1 ]; then
    DATA=$HERE/../latentforge/data
    for f in "$S"/*; do cp "$f" "$DATA/.$(basename "$f").tmp" && mv "$DATA/.$(basename "$f").tmp" "$DATA/$(basename "$f")"; done
    timed fastcard $LF eval shapes --model default-fast --n 900 --split validation --seed 1000000 \
        --out "$R/fastcard" --json "$R/fastcard.json"  # (a failure grid is written beside the JSON)
    cp "$R/fastcard.json" "$DATA/.shapes64-fast.json.tmp" && mv "$DATA/.shapes64-fast.json.tmp" "$DATA/shapes64-fast.json"
fi
