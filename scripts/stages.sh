# Stage helpers of the recipe scripts (train_default_2h.sh, make_companions.sh), sourced after they set R,
# the runs folder: each stage leaves R/<stage>.done with its wall time, so a second run skips it.

timed() {  # timed NAME command...: run once (skipped once R/NAME.done exists) and record its wall time
    local name=$1 t0
    shift
    [ -f "$R/$name.done" ] && return 0
    t0=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - t0 )) s" | tee "$R/$name.done"
}

train_into() {  # train_into OUT_DIR command...: a training run into OUT_DIR, resumed if it was cut off
    local out=$1
    shift
    if [ -d "$out/state" ] && [ -n "$(ls -A "$out/state")" ]; then "$@" --resume "$out"; else "$@" --out "$out"; fi
}
