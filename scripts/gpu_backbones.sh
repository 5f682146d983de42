#!/usr/bin/env bash
# Train the candidate Tiny-ImageNet backbones side by side on one GPU, inside a wall-clock budget
# (docs/worlds.md, "On a GPU"). Run from the repo root on a CUDA machine:
#
#     scripts/gpu_backbones.sh ROOT OUT TRAIN_SECONDS
#
# ROOT: the dataset folder or its .tar.gz (extracted once into $WORK/dataset). OUT: each candidate
# writes OUT/<name>/backbone.json + backbone.safetensors (a run stopped by the guard writes its
# train.json there instead). TRAIN_SECONDS: the wall time the training phase may take.
#
# One epoch count serves every candidate, and it is fixed before training: all candidates first run
# PROBE_STEPS steps together (the probe), and the count is the largest (at most MAX_EPOCHS) that
# the slowest of them fits into 85% of TRAIN_SECONDS at the probe's speed. The recipe is then plain
# `vitedit world build tiny-imagenet --stage backbone` with that count; the log prints each command.
# Environment: CANDIDATES (names below, space-separated; default a, b, c: the measured run 1),
# EPOCHS (skips the probe), EXTRA (options
# appended to every run; argparse keeps the last, so EXTRA="--cutmix 1.0" overrides the 0.5), WORK
# (must not hold runs of an earlier call: a world build resumes a checkpoint it finds).
# The measured runs: docs/bench/tiny-imagenet/gpu-backbones/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { echo "usage: $0 ROOT OUT TRAIN_SECONDS" >&2; exit 2; }
ROOT=$1 OUT=$2 TRAIN_SECONDS=$3
if ! [[ $TRAIN_SECONDS =~ ^[0-9]+$ ]] || [ "$TRAIN_SECONDS" -lt 1 ]; then
    echo "TRAIN_SECONDS must be a whole number of seconds, at least 1; got '$TRAIN_SECONDS'" >&2
    exit 2
fi
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/vitedit-gpu-backbones}
MAX_EPOCHS=${MAX_EPOCHS:-200}
PROBE_STEPS=${PROBE_STEPS:-60}
BATCH=${BATCH:-512}
EXTRA=${EXTRA:-}  # e.g. "--train-per-class 8" for a dry run on the CPU
COMMON="--stage backbone --device $DEVICE --threads 4 --batch-size $BATCH --lr 2e-3 \
--warmup-epochs 5 --cutmix 0.5 --precision bf16 $EXTRA"
read -r -a NAMES <<<"${CANDIDATES:-a-w128-t16 b-w192-t16 c-w192-t64}"
declare -A ARCH=(
    [a-w128-t16]="--width 128 --tokens 16"
    [b-w192-t16]="--width 192 --tokens 16"
    [c-w192-t64]="--width 192 --tokens 64"
    [d-stage-w128]="--stem conv-stage --width 128 --tokens 16"    # one ResNetV2 stage (CPU: 27.08%)
    [e-stages-w128]="--stem conv-stages --width 128 --tokens 16"  # two stages (docs/worlds.md)
)
export PYTHONUNBUFFERED=1
for name in "${NAMES[@]}"; do  # a run's folder left from an earlier call would be resumed, not restarted
    if [ -e "$WORK/run-$name" ]; then
        echo "$WORK/run-$name exists: give a fresh WORK (a world build resumes what it finds there)" >&2
        exit 2
    fi
done
mkdir -p "$WORK" "$OUT"
if [ -f "$ROOT" ]; then
    mkdir -p "$WORK/dataset" && tar xzf "$ROOT" -C "$WORK/dataset"
    ROOT=$(dirname "$(find "$WORK/dataset" -name wnids.txt | head -1)")
fi
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

build() {  # build NAME WORKDIR OUTDIR ARGS...: one `vitedit world build` run, logged
    local name=$1 work=$2 out=$3
    shift 3
    local cmd="$PY -m cli.main world build tiny-imagenet --root $ROOT --work $work --out $out \
$COMMON ${ARCH[$name]} $*"
    echo "[$name] $cmd"
    $cmd >"$work.log" 2>&1 || echo "[$name] exit $?"
}

# the probe: every candidate at once, PROBE_STEPS steps (skipped when EPOCHS is given)
if [ -z "${EPOCHS:-}" ]; then
for name in "${NAMES[@]}"; do
    build "$name" "$WORK/probe-$name" "$WORK/probe-out-$name" --epochs "$MAX_EPOCHS" \
        --stop-at-step "$PROBE_STEPS" &
done
wait
tail -n 3 "$WORK"/probe-*.log
EPOCHS=$($PY - "$WORK" "$TRAIN_SECONDS" "$MAX_EPOCHS" "$BATCH" "${NAMES[@]}" <<'EOF'
import json, math, sys
work, budget, cap, batch, names = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
slowest = 0.0
for name in names:
    state = json.load(open(f"{work}/probe-{name}/backbone-checkpoint/train.json"))
    per_step = state["seconds"] / state["step"]
    print(f"[probe] {name}: {state['step']} steps, {per_step * 1000:.1f} ms/step together", file=sys.stderr)
    slowest = max(slowest, per_step)
per_epoch = 80_000 // batch  # 400 images x 200 classes
print(max(1, min(cap, math.floor(0.85 * budget / (slowest * per_epoch)))))
EOF
)
fi
echo "[plan] $EPOCHS epochs for every candidate"

# the runs: every candidate at once, from fresh work folders (the decoded data shared)
for name in "${NAMES[@]}"; do
    mkdir -p "$WORK/run-$name"
    [ -f "$WORK/probe-$name/tiny-imagenet-32.npz" ] &&
        ln -sf "$WORK/probe-$name/tiny-imagenet-32.npz" "$WORK/run-$name/"
    build "$name" "$WORK/run-$name" "$OUT/$name" --epochs "$EPOCHS" \
        --time-budget "$TRAIN_SECONDS" &
done
wait
for name in "${NAMES[@]}"; do
    echo "== $name"
    tail -n 4 "$WORK/run-$name.log"
    if [ ! -f "$OUT/$name/backbone.json" ]; then
        mkdir -p "$OUT/$name"
        cp "$WORK/run-$name/backbone-checkpoint/train.json" "$OUT/$name/" 2>/dev/null || true
    fi
    $PY - "$OUT/$name" "$WORK/run-$name/backbone-checkpoint/train.json" <<'EOF'
import json, sys
from pathlib import Path
state = json.load(open(sys.argv[2]))
for h in state["history"]:
    fitted = f", train {h['train_accuracy']:.4f}" if "train_accuracy" in h else ""
    print(f"  epoch {h['epoch']}: loss {h['loss']}, val {h['eval_accuracy']:.4f}{fitted}, {h['seconds']} s")
print("  finished:", (Path(sys.argv[1]) / "backbone.json").exists())
EOF
done
