#!/usr/bin/env bash
# One accelerator training run, for the device tool: carry runs/pack (python -m model.training.pack builds it here).
#   run(command="scripts/accelerator_train.sh", carry=["runs/pack"], timeout_s=600)
# The machine's python3 has torch, timm, OpenCV, NumPy, SciPy, safetensors and PyYAML; nothing is installed.
# Weights land in $OUT/fast-last.safetensors (every minute, so a timeout still returns some), with
# log.jsonl, summary.json and train.log. Nothing under model/weights is touched: evaluate, then ship.
# Extra arguments go to model.training.fast_train, e.g. --set loss_rounds=last for the paper's comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/fast}"
MINUTES="${MINUTES:-8.0}"
PACK="${PACK:-runs/pack/train-pack.npz}"
mkdir -p "$OUT"
[ -f "$PACK" ] || { echo "no training pack at $PACK: build it with python -m model.training.pack and carry runs/pack" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt" || true
PYTHONUNBUFFERED=1 python3 -m model.training.fast_train --pack "$PACK" --out-dir "$OUT" --set "minutes=$MINUTES" "$@" 2>&1 \
    | tee "$OUT/train.log"
