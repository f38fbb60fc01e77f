#!/usr/bin/env bash
# train.sh - a retrofit training run on every GPU of this machine:
#   1. one process tokenises and caches the data (--prepare-dataset-only),
#   2. `accelerate launch` starts one training process per GPU (DDP, or FSDP
#      when the config sets trainer.fsdp).
# Without GPUs it runs on the CPU: one process, or NUM_PROCESSES=N processes
# in a gloo group.
#
# Usage (any directory):  bash scripts/train.sh CONFIG [--set KEY=VALUE ...]
#   e.g. bash scripts/train.sh configs/qwen3_8b.yaml
#        bash scripts/train.sh configs/tiny.yaml --set trainer.max_steps=20
# Environment: NUM_PROCESSES (default: the number of GPUs, 1 without GPUs),
#   PYTHON (default python), ACCELERATE_ARGS (extra `accelerate launch`
#   arguments, e.g. "--main_process_port 29600" or multi-node settings).
# Relative paths in the config (output_dir, ...) are taken from the
# repository root, where this script runs the training.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/train.sh CONFIG [--set KEY=VALUE ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [ ! -f "$CONFIG" ]; then
    echo "train.sh: config not found: $CONFIG" >&2
    exit 2
fi
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ -n "${NUM_PROCESSES:-}" ]; then
    N=$NUM_PROCESSES
elif [ "$GPUS" -gt 0 ]; then
    N=$GPUS
else
    N=1
fi
echo "== train.sh: $CONFIG on $N process(es), $GPUS GPU(s) found"

echo "== preparing the training data (one process)"
"$PYTHON" -m models.qwen3.train --config "$CONFIG" --prepare-dataset-only "$@"

# accelerate's torchrun launcher (--multi_gpu) starts N processes; on a
# machine without GPUs the training joins them in a gloo group on the CPU.
if [ "$N" -gt 1 ]; then
    LAUNCH=(--multi_gpu --num_processes "$N")
else
    LAUNCH=(--num_processes 1)
fi
# shellcheck disable=SC2206
EXTRA=(${ACCELERATE_ARGS:-})
echo "== accelerate launch ${LAUNCH[*]} ${EXTRA[*]} -m models.qwen3.train --config $CONFIG $*"
exec "$PYTHON" -m accelerate.commands.launch "${LAUNCH[@]}" --num_machines 1 --mixed_precision no \
    --dynamo_backend no "${EXTRA[@]}" -m models.qwen3.train --config "$CONFIG" "$@"
