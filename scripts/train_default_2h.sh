#!/usr/bin/env bash
# The default model's recipe within issue 10's budget (2 hours on 2 CPU cores): a VAE and a denoiser with
# its text tower, from scratch, one seed per stage. With no switches it makes the shipped file (the ninth
# version, MODEL_CARD.md "Recipe": 122.4 min end to end on a slow day of a 2-core Xeon): ε with Min-SNR-5
# and a 5000-step decoder stage. Usage: [PY=.venv/bin/python] [NET=unet|dit] [OBJ=eps-minsnr|eps|flow]
# [VAEDEC_STEPS=N] [VAEDEC_DETAIL=W] [VAEDEC_FOCUS=P] [VAEDEC_WHOLE=1] [VAE1_WHOLE=1] [B_STEPS=N]
# [SMALLW=W] [VAE=f4|f8|c8]
# scripts/train_default_2h.sh RUNS_DIR
# OBJ=eps-minsnr (default): SD1's ε-prediction on the 1000-step table (t ~ U{0..999}) for stages A and B, with
# Min-SNR-5 loss weighting in stage B (Hang et al. 2023); stage A is ε's own, shared (folder unet-epsA),
# since it trains at SNR ≈ 0 where the weight is 1 (MODEL_CARD.md, "Where the small shapes are lost, and
# Min-SNR": 1 / 2 / 3 validation objects 97.1 / 93.1 / 84.4% against ε's 95.8 / 90.3 / 78.1%).
# OBJ=eps: ε without the weighting; OBJ=flow: rectified flow, the preset's own objective (the objective
# comparison in MODEL_CARD.md's history: ε 86.9 against flow's 84.2% on the same validation prompts).
# NET=dit: the same stages with the DiT of `--preset shapes64-dit` as the denoiser (the architecture
# comparison: ahead of the UNet at step 3000 of stage B, behind it at the end, 75.8 vs 84.2%).
# VAE=f8: the VAE-factor comparison: every stage on `shapes64-vae-f8`'s 8×8×16 latents (f = 8, 16 channels:
# SD3's form, the same 12× fewer values as f = 4's 16×16×4) with the UNet `shapes64-f8` (twice the widths at
# half the resolution: each convolution costs what f = 4's does); its own VAE, cache and stage folders
# (suffix -f8), the same scenes.
# VAE=c8: the latent-channel comparison: f = 4 with 8 channels (`shapes64-vae-c8`'s 16×16×8) and the UNet
# `shapes64-c8` (`shapes64` but for its first and last convolutions); suffix -c8, the same scenes.
# VAEDEC_STEPS=N: the decoder-alone VAE stage's length (default 5000, ~17 min; 3000 took 10 min, and 6000
# raised the ε model's 1-object cell from 95.0 to 96.3%: "ε, and the decoder stage's length").
# VAEDEC_DETAIL=W: that stage's `--detail_weight` (default 0: plain L2, the shipped recipe; 12,000 more
# decoder steps on the shipped VAE lift the model 2-5 points with W = 5 or plain L2 alike: the length counts,
# not the weight; MODEL_CARD.md, "Not done yet"). VAEDEC_FOCUS=P: that stage's `--crop_focus` in percent
# (default 0: uniform windows; P% of them placed on an object, whole: feed.ShapesTrain). VAEDEC_WHOLE=1:
# that stage on whole 64² scenes at batch 8 (the same pixels, and FLOPs, a step as 32 windows of 32²), so the
# decoder learns from the latents of whole scenes, as the denoiser makes them (5000 such steps on the shipped
# VAE: validation 96.9% against 94.1%, judges 2.8% against 5.2%; run end to end from VAE 1 on 2026-12-07,
# 92.3% / 7.3%, a new draw of the denoiser below the shipped one: MODEL_CARD.md, "Not done yet").
# VAE1_WHOLE=1: the VAE's first stage on whole 64² scenes at batch 8 too (the same pixels, and FLOPs, a step
# as its 32 windows of 32²), so that encoder and decoder learn from what they are used on; every later stage
# runs on that VAE, in its own folders (suffix -vw: vae-vw, cache-vw, unet-vw-...). It makes a worse VAE
# (round trip after a 5000-step whole-scene decoder stage 88.1% against the windows' 95.3%: MODEL_CARD.md,
# "Not done yet"); the decoder stage's whole-scene steps are what count (10,000 against 5000 on the e2e42
# run's VAE 1 took the model from 92.3 to 94.4% on validation).
# SMALLW=W: stage B's `--small_object_weight` (default 0: off, the shipped recipe): the latent pixels of
# each small object a caption states weigh 1 + W in its loss (shapes.data.small_object_weights: a function
# of the caption, so the optimum is unchanged); its own stage B folder and file (suffix -small<W>).
# B_STEPS=N: stage B's length (default 9000); paying for a longer decoder stage with it does not work (6000
# with a 9500-step decoder stage: 90.0% against 94.1% validation).
# Each stage leaves RUNS_DIR/<stage>.done with its wall time; run the script again to continue after a stop
# (a stage that was cut off resumes from its last saved state).
set -euo pipefail
R=${1:?usage: scripts/train_default_2h.sh RUNS_DIR}
PY=${PY:-python}
LF="$PY -m latentforge"
NET=${NET:-unet}
case $NET in
    unet) DENOISER=(--preset shapes64 --unet.mask_text_padding true) SUFFIX="" ;;
    dit) DENOISER=(--preset shapes64-dit --dit.mask_text_padding true) SUFFIX="-dit" ;;
    *) echo "NET must be unet or dit, got '$NET'" >&2; exit 2 ;;
esac
VAE=${VAE:-f4}
case $VAE in
    f4) VAEPRESET=shapes64-vae F="" ;;
    f8|c8) VAEPRESET=shapes64-vae-$VAE F=-$VAE ;;
    *) echo "VAE must be f4, f8 or c8, got '$VAE'" >&2; exit 2 ;;
esac
if [ "$VAE" != f4 ] && [ "$NET" != unet ]; then
    echo "VAE=$VAE has a UNet preset only (shapes64-$VAE); got NET=$NET" >&2
    exit 2
fi
if [ "$VAE" != f4 ]; then DENOISER[1]=shapes64-$VAE; fi
VAEDEC_STEPS=${VAEDEC_STEPS:-5000}
case $VAEDEC_STEPS in
    ''|*[!0-9]*|0) echo "VAEDEC_STEPS must be a positive whole number, got '$VAEDEC_STEPS'" >&2; exit 2 ;;
esac
VAEDEC_DETAIL=${VAEDEC_DETAIL:-0}
case $VAEDEC_DETAIL in
    ''|*[!0-9]*|0?*) echo "VAEDEC_DETAIL must be a whole number >= 0, got '$VAEDEC_DETAIL'" >&2; exit 2 ;;
esac
VAEDEC_FOCUS=${VAEDEC_FOCUS:-0}
case $VAEDEC_FOCUS in
    ''|*[!0-9]*|0?*) echo "VAEDEC_FOCUS must be a whole percentage 0..100, got '$VAEDEC_FOCUS'" >&2; exit 2 ;;
esac
if [ "$VAEDEC_FOCUS" -gt 100 ]; then
    echo "VAEDEC_FOCUS must be a whole percentage 0..100, got '$VAEDEC_FOCUS'" >&2
    exit 2
fi
VAEDEC_WHOLE=${VAEDEC_WHOLE:-0}
case $VAEDEC_WHOLE in
    0|1) ;;
    *) echo "VAEDEC_WHOLE must be 0 or 1, got '$VAEDEC_WHOLE'" >&2; exit 2 ;;
esac
VAE1_WHOLE=${VAE1_WHOLE:-0}
case $VAE1_WHOLE in
    0|1) ;;
    *) echo "VAE1_WHOLE must be 0 or 1, got '$VAE1_WHOLE'" >&2; exit 2 ;;
esac
if [ "$VAEDEC_WHOLE" = 1 ] && [ "$VAEDEC_FOCUS" != 0 ]; then
    echo "VAEDEC_FOCUS places windows; VAEDEC_WHOLE=1 has none (whole scenes): set one of them" >&2
    exit 2
fi
SMALLW=${SMALLW:-0}
case $SMALLW in
    ''|*[!0-9]*|0?*) echo "SMALLW must be a whole number >= 0, got '$SMALLW'" >&2; exit 2 ;;
esac
B_STEPS=${B_STEPS:-9000}
case $B_STEPS in
    ''|*[!0-9]*|0*) echo "B_STEPS must be a positive whole number, got '$B_STEPS'" >&2; exit 2 ;;
esac
OBJ=${OBJ:-eps-minsnr}
WEIGHTING=()  # stage B's loss weighting beyond the objective (stage A never has one)
case $OBJ in
    flow) OBJECTIVE=() ;;
    eps|eps-minsnr) OBJECTIVE=(--objective.prediction eps --objective.sigma_sampling uniform_discrete) ;;
    *) echo "OBJ must be flow, eps or eps-minsnr, got '$OBJ'" >&2; exit 2 ;;
esac
# what a VAE stage learns from: random 32×32 windows, 32 a step, or whole 64² scenes, 8 a step (the same
# pixels)
CROPS=(--crop 32 --batch_size 32) WHOLE=(--crop 0 --batch_size 8)
VAE1_WINDOWS=("${CROPS[@]}")
if [ "$VAE1_WHOLE" = 1 ]; then F=$F-vw VAE1_WINDOWS=("${WHOLE[@]}"); fi
SUFFIX=$F$SUFFIX
ASUFFIX=$SUFFIX  # stage A's folder: ε's for both ε recipes
if [ "$OBJ" != flow ]; then ASUFFIX="$SUFFIX-eps" SUFFIX="$SUFFIX-$OBJ"; fi
if [ "$OBJ" = eps-minsnr ]; then WEIGHTING=(--objective.weighting min_snr --objective.min_snr_gamma 5); fi
BSTAGE=${NET}${SUFFIX}B  # stage B's folder, and below the shipped file's tag: their own for another length
if [ "$B_STEPS" != 9000 ]; then BSTAGE=$BSTAGE$B_STEPS SUFFIX=$SUFFIX-b$B_STEPS; fi
if [ "$SMALLW" != 0 ]; then
    BSTAGE=$BSTAGE-small$SMALLW SUFFIX=$SUFFIX-small$SMALLW WEIGHTING+=(--small_object_weight "$SMALLW")
fi
mkdir -p "$R"
# shellcheck source=stages.sh
source "$(dirname "$0")/stages.sh"  # timed, train_into

stage() {  # stage NAME OUT_DIR command...: a timed training stage
    local name=$1
    shift
    timed "$name" train_into "$@"
}

# VAE: f = 4 (VAE=f8: f = 8, 16 channels; VAE=c8: 8 channels), narrow posterior from the start (log-variance
# bias -6), L2 on random 32×32 windows, batch 32 (VAE1_WHOLE=1: whole scenes, batch 8)
stage "vae$F" "$R/vae$F" $LF train vae --preset $VAEPRESET --logvar_init -6 --recon l2 --lr 1e-3 \
    --lr_schedule cosine --min_lr_ratio 0.1 "${VAE1_WINDOWS[@]}" --warmup_steps 10 --max_steps 3000 \
    --checkpoint_every 500 --seed 0

# 60,000 training scenes, 80% of them captioned in the labelled form the layout completion writes
timed data $LF shapes export "$R/data" --n 60000 --size 64 --seed 21 --labelled_share 0.8 --background_share 0.8

# the denoiser stages read the scenes' latents from one cache (encoded at stage A's start) in the training
# process itself: a loader worker would only compete with the step's two threads (0.48 against 0.51 s a step
# of stage B, the same batches and weights bit for bit; benchmarks/recipe_step.py)
LATENTS=(--vae "$R/vae$F/checkpoints/last.safetensors" --data "$R/data" --cache_latents true
    --cache_dir "$R/cache$F" --num_workers 0)

# denoiser + text tower, stage A: 300 steps at σ = 1 only (the text is all there is to read), padding
# tokens masked out of the cross-attention; the latents are encoded once into the shared cache
stage "${NET}${ASUFFIX}A" "$R/${NET}${ASUFFIX}A" $LF train denoiser "${DENOISER[@]}" "${OBJECTIVE[@]}" \
    "${LATENTS[@]}" \
    --objective.terminal_fraction 0.99 --lr 8e-4 --warmup_steps 50 --max_steps 300 --checkpoint_every 300 \
    --seed 0

# stage B: the usual σ's, lr 8e-4 with cosine decay to 8e-5
stage "$BSTAGE" "$R/$BSTAGE" $LF train denoiser "${DENOISER[@]}" "${OBJECTIVE[@]}" \
    ${WEIGHTING[@]+"${WEIGHTING[@]}"} --init_from "$R/${NET}${ASUFFIX}A/checkpoints/last.safetensors" \
    "${LATENTS[@]}" \
    --lr 8e-4 --lr_schedule cosine --min_lr_ratio 0.1 --warmup_steps 50 \
    --max_steps "$B_STEPS" --checkpoint_every 500 --seed 1

# VAE, stage 2: the decoder (and post_quant_conv) alone, VAEDEC_STEPS steps; the encoder, quant_conv and the
# latent scale stay bit-identical, so the denoiser's latents keep their meaning (the shipped recipe's VAE
# stage 5). It needs only the stage-1 VAE, so it may run before the denoiser as well as after it. Its folder
# is vaedec, or vaedec<N> for another length (and -detail<W> with a detail weight, -focus<P> with focused
# windows, -whole on whole scenes), so that a changed VAEDEC_* switch never reuses a finished stage.
DEC=vaedec TAG=$SUFFIX
if [ "$VAEDEC_STEPS" != 3000 ]; then DEC=vaedec$VAEDEC_STEPS TAG=$SUFFIX-dec$VAEDEC_STEPS; fi
DECFLAGS=()  # plain L2 on uniform windows unless VAEDEC_DETAIL or VAEDEC_FOCUS is set
if [ "$VAEDEC_DETAIL" != 0 ]; then
    DEC=$DEC-detail$VAEDEC_DETAIL TAG=$TAG-detail$VAEDEC_DETAIL DECFLAGS=(--detail_weight "$VAEDEC_DETAIL")
fi
if [ "$VAEDEC_FOCUS" != 0 ]; then
    DEC=$DEC-focus$VAEDEC_FOCUS TAG=$TAG-focus$VAEDEC_FOCUS
    DECFLAGS+=(--crop_focus "$(printf '%d.%02d' $((VAEDEC_FOCUS / 100)) $((VAEDEC_FOCUS % 100)))")
fi
WINDOWS=("${CROPS[@]}")
if [ "$VAEDEC_WHOLE" = 1 ]; then DEC=$DEC-whole TAG=$TAG-whole WINDOWS=("${WHOLE[@]}"); fi
DEC=$DEC$F
stage "$DEC" "$R/$DEC" $LF train vae --preset $VAEPRESET --init_from "$R/vae$F/checkpoints/last.safetensors" \
    --train_part decoder --recon l2 ${DECFLAGS[@]+"${DECFLAGS[@]}"} --lr 5e-4 --lr_schedule cosine \
    --min_lr_ratio 0.1 "${WINDOWS[@]}" --warmup_steps 20 --max_steps "$VAEDEC_STEPS" \
    --checkpoint_every 500 --seed 2

# the model file: float16, the denoiser and text tower of stage B with the stage-2 VAE, the default
# model's generation defaults (20 steps, euler_ancestral, CFG 3, the layout prompt completion)
timed "ship$TAG" $PY "$(dirname "$0")/ship_default_model.py" \
    "$R/$BSTAGE/checkpoints/last.safetensors" \
    --vae "$R/$DEC/checkpoints/last.safetensors" --dtype float16 --sampler euler_ancestral --cfg 3 \
    --complete-prompt layout --out "$R/shapes64-2h$TAG.safetensors"
