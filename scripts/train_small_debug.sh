#!/usr/bin/env bash
# train_small_debug.sh - a debugging retrofit on one small GPU (configs/qwen3_1.7b.yaml:
# Qwen3-1.7B, 2048-token sequences, no FSDP).
#
# Usage (any directory):  bash scripts/train_small_debug.sh [CONFIG] [--set KEY=VALUE ...]
# Environment: CUDA_VISIBLE_DEVICES (default 0), PYTHON (default python).
set -euo pipefail
CONFIG=${1:-configs/qwen3_1.7b.yaml}
[ $# -gt 0 ] && shift
if [ -f "$CONFIG" ]; then
    CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
fi
cd "$(dirname "$0")/.."
if [ ! -f "$CONFIG" ]; then
    echo "train_small_debug.sh: config not found: $CONFIG" >&2
    exit 2
fi
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
# Fewer out-of-memory failures from fragmentation on a small card.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

echo "== preparing the training data"
"$PYTHON" -m models.qwen3.train --config "$CONFIG" --prepare-dataset-only "$@"
echo "== training on GPU $CUDA_VISIBLE_DEVICES"
exec "$PYTHON" -m models.qwen3.train --config "$CONFIG" "$@"
