#!/usr/bin/env bash
# The CUDA kernels' logic on the CPU emulator (tests/cuda_emu), long runs for a
# developer; CI runs the short selection (python -m pytest -q -m emu).
#   bash scripts/cuda_emu.sh attn [i/n]       # full attn_train matrix (tensor-core + SIMT)
#   bash scripts/cuda_emu.sh cache            # all cache sequences
#   bash scripts/cuda_emu.sh fuzz SEED COUNT  # random cache sequences
#   bash scripts/cuda_emu.sh mutate [attn|cache] [index ...]   # every mutation must be caught
# Needs g++ with C++20 <barrier> and torch. Runs under nice: it takes every core.
set -euo pipefail
cd "$(dirname "$0")/.."
exec nice -n 19 python -m tests.cuda_emu "$@"
