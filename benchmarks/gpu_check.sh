#!/usr/bin/env bash
# One command for a lent GPU machine (H100 / H200, about 5 minutes): every figure the project
# still needs from a GPU, in one JSON file.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--device auto|cuda[:i]|cpu] [--python PY] [--shrink]
#
# (a) the quick sampling suite on the device (pytest --benchmark-only -m quick: the paper's U-Net,
#     256x256, T = 20, naive_loop / batch_repeat / engine / engine_fast), its JSON kept as
#     DIR/sampling.json;
# (b) `uqsynth predict` on a 240x240x155 T1w phantom volume (BraTS' grid) at 256x256 and T = 20,
#     timed, with the model from a short `uqsynth run` of plugins/bcgan_t1t2.toml at image_size
#     256 (the paper's networks, its mc_dropout arm alone, 2 steps: the weights are untrained,
#     the cost of sampling them is the real one);
# (c) training steps per second of the main job's MC-dropout arm at 256x256, batch 16, in fp32 and
#     bf16 (python -m benchmarks._gpu_check train);
# then DIR/gpu_check.json with all of it, the device, torch's version and the commit
# (benchmarks/README.md lists its fields).
#
# --shrink makes every stage tiny (64x64 sampling at T = 10, a 60x60x40 volume at 32x32 and
# T = 4, 32x32 training steps) so that the whole check runs on a CPU in about a minute: what
# tests/test_gpu_check.py runs. Without --shrink a CUDA device is required.
# Errors print one line, `error: ...`, and exit with status 2; a stage that fails exits with its
# status after saying which stage it was.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
    echo "error: gpu_check: $*" >&2
    exit 2
}

usage() {
    sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

OUT="$ROOT/runs/gpu_check"
DEVICE_SPEC="auto"
PYTHON=""
SHRINK=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --out | --device | --python)
            if [ "$#" -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then die "$1 needs a value"; fi
            case "$1" in
                --out) OUT="$2" ;;
                --device) DEVICE_SPEC="$2" ;;
                --python) PYTHON="$2" ;;
            esac
            shift 2
            ;;
        --shrink) SHRINK=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

# The project's interpreter: --python, else the checkout's .venv, else python3.
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "--python $PYTHON: no such interpreter"

# --out must be new or empty: a half-overwritten directory would mix two machines' figures.
if [ -e "$OUT" ]; then
    [ -d "$OUT" ] || die "--out $OUT: exists and is not a directory"
    [ -z "$(ls -A "$OUT")" ] || die "--out $OUT: not empty (give a new directory)"
fi

cd "$ROOT"
# The device, and whether this interpreter has what the stages need (uqsynth, pytest-benchmark).
ERR="$(mktemp)"
trap 'rm -f "$ERR"' EXIT
status=0
DEVICE="$("$PYTHON" -m benchmarks._gpu_check device --device "$DEVICE_SPEC" 2>"$ERR")" || status=$?
if [ "$status" -eq 2 ]; then
    cat "$ERR" >&2
    exit 2
elif [ "$status" -ne 0 ]; then
    die "$PYTHON cannot run benchmarks/_gpu_check.py (install the project: pip install -e \".[test]\"): $(tail -n 1 "$ERR")"
fi
if [ "$SHRINK" -eq 0 ] && [ "${DEVICE%%:*}" != "cuda" ]; then
    die "no CUDA device (--device $DEVICE_SPEC gave $DEVICE): the full check is for a GPU machine; --shrink runs a tiny one on the CPU"
fi
ARM_SET="$("$PYTHON" -m benchmarks._gpu_check arm)" || exit 2
mkdir -p "$OUT" 2>/dev/null || die "--out $OUT: cannot create the directory"
OUT="$(cd "$OUT" && pwd)"

if [ "$SHRINK" -eq 1 ]; then
    MODE=shrink
    SAMPLING_SELECT=(-k "unet-64px-T10")
    SAMPLING_ENV=(UQSYNTH_BENCH_SLICES=1 UQSYNTH_BENCH_ROUNDS=1 UQSYNTH_BENCH_FAST=bf16)
    VOLUME=(60 60 40) IMAGE_SIZE=32 PREDICT_T=4 NGF=8 NDF=8
    TRAIN=(--image-size 32 --ngf 8 --ndf 8 --batch-size 4 --steps 2 --warmup 1)
else
    MODE=full
    SAMPLING_SELECT=(-m quick)
    SAMPLING_ENV=()
    VOLUME=(240 240 155) IMAGE_SIZE=256 PREDICT_T=20 NGF=64 NDF=64
    TRAIN=(--image-size 256 --ngf 64 --ndf 64 --batch-size 16 --steps 20 --warmup 5)
fi

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
stage() { echo "gpu_check: $*" >&2; }
SECONDS_OF=()  # NAME=SECONDS of every stage, for the report
run_stage() {  # NAME COMMAND...: run it, its output in DIR/NAME.log; on failure say which stage and show the log's end
    local name="$1" started status=0
    shift
    started="$(now)"
    "$@" >"$OUT/$name.log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        tail -n 30 "$OUT/$name.log" >&2
        echo "error: gpu_check: stage $name failed with status $status (log: $OUT/$name.log)" >&2
        exit "$status"
    fi
    SECONDS_OF+=("$name=$(since "$started")")
}
STARTED="$(now)"

stage "(a) sampling suite on $DEVICE ($MODE)"
run_stage sampling env UQSYNTH_BENCH_DEVICE="$DEVICE" "${SAMPLING_ENV[@]}" \
    "$PYTHON" -m pytest benchmarks/test_sampling_throughput.py --benchmark-only "${SAMPLING_SELECT[@]}" \
    --benchmark-json "$OUT/sampling.json" -p no:cacheprovider -q

stage "(b) a ${VOLUME[0]}x${VOLUME[1]}x${VOLUME[2]} T1w volume, a model at ${IMAGE_SIZE}x${IMAGE_SIZE}, predict at T=$PREDICT_T"
run_stage phantom "$PYTHON" -c "
import sys
from uqsynth.data.phantom import write_subjects
write_subjects(sys.argv[1], 1, seed=1000, shape=tuple(int(v) for v in sys.argv[2:5]))
" "$OUT/volume" "${VOLUME[@]}"
run_stage run "$PYTHON" -m uqsynth run plugins/bcgan_t1t2.toml --out "$OUT/run" --device "$DEVICE" \
    --set data.source=phantom --set data.image_size="$IMAGE_SIZE" --set data.load_size="$IMAGE_SIZE" \
    --set data.phantom.subjects=3 --set "data.phantom.shape=[32,32,16]" \
    --set model.generator.ngf="$NGF" --set model.discriminator.ndf="$NDF" \
    --set train.epochs=1 --set train.max_steps_per_epoch=2 --set train.batch_size=4 --set sampling.samples=2 \
    --set 'calibration.calibrators=["isotonic"]' --set calibration.max_subjects=1 --set "$ARM_SET"
run_stage predict "$PYTHON" -m uqsynth predict --model "$OUT/run/mc_dropout" \
    --input "$OUT/volume/phantom-000/phantom-000-t1n.nii.gz" --out "$OUT/predict" --samples "$PREDICT_T" \
    --device "$DEVICE"

stage "(c) training steps per second, fp32 and bf16"
run_stage training "$PYTHON" -m benchmarks._gpu_check train --device "$DEVICE" "${TRAIN[@]}" \
    --out "$OUT/training.json"

run_stage report "$PYTHON" -m benchmarks._gpu_check report --dir "$OUT" --mode "$MODE" --device "$DEVICE" \
    --volume-shape "${VOLUME[@]}" --image-size "$IMAGE_SIZE" --predict-samples "$PREDICT_T" \
    --stage-seconds "${SECONDS_OF[@]}" --total-seconds "$(since "$STARTED")"
stage "done in $(since "$STARTED") s: $OUT/gpu_check.json"
echo "$OUT/gpu_check.json"
