#!/usr/bin/env bash
# gpu_check.sh - everything CUDA, in one run on a lent GPU machine (the
# `device` tool), within a few minutes:
#   build (no network there: --no-build-isolation --no-deps), self-check,
#   CUDA-vs-CPU tests, the whole suite, compute-sanitizer memcheck over the
#   CUDA tests, benchmarks; a summary table is printed last.
# Usage (from the repository root):  bash scripts/gpu_check.sh
# Logs go to $OUT (the device tool brings them back) or /tmp/dms_gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dms_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
declare -a NAMES STATUS DETAIL

# Everything must fit one device call (at most 600 s): steps run in order of
# importance, and a step that would start past the budget is skipped.
BUDGET=${GPU_CHECK_BUDGET:-540}

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local log="$OUT/$name.log"
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        NAMES+=("$name"); STATUS+=(skipped); DETAIL+=("out of time budget (${BUDGET}s)")
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    tail -n 25 "$log"
    NAMES+=("$name")
    STATUS+=("$([ $rc -eq 0 ] && echo ok || echo "FAIL($rc)")")
    DETAIL+=("$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-90) [$((SECONDS - start))s]")
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# Build for this GPU only (half the nvcc time of the default "80;90").
if [ -z "${DMS_CUDA_ARCHS:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
    case $cap in ''|*[!0-9]*) ;; *) export DMS_CUDA_ARCHS=$cap ;; esac
fi
echo "DMS_CUDA_ARCHS=${DMS_CUDA_ARCHS:-80;90 (default)}"

if ! step build 400 "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    step build_inplace 400 "$PY" setup.py build_ext --inplace
fi
step selfcheck 120 "$PY" -m dms
step cuda_tests 300 "$PY" -m pytest -q -m cuda tests
if command -v compute-sanitizer >/dev/null; then
    step memcheck 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_gate.py tests/test_attn_train.py tests/test_cache.py
else
    NAMES+=(memcheck); STATUS+=(skipped); DETAIL+=("compute-sanitizer not on PATH")
fi
step bench_attn_train 200 "$PY" bench/attention_train.py --device cuda --seq 1024,4096,16384 --dtype bfloat16,float32
step bench_decode 120 "$PY" bench/decode.py --device cuda
step bench_prefill 120 "$PY" bench/prefill.py --device cuda --seq 4096,16384 --chunk 4096
step bench_gate 60 "$PY" bench/gate.py --device cuda --dtype bfloat16
if command -v compute-sanitizer >/dev/null; then
    step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 \
        "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_attn_train.py tests/test_cache.py -k "float32"
    step racecheck_mma 120 compute-sanitizer --tool racecheck --error-exitcode 9 \
        "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_attn_train.py -k "tensor_core and T17"
fi
step all_tests 300 "$PY" -m pytest -q -x tests --ignore=tests/test_sanitized.py

echo
echo "=== benchmark tables"
cat "$OUT"/bench_*.log 2>/dev/null | grep -E '^(\||gate|attn_train|decode|prefill)'
echo
echo "=== summary ($(cat "$OUT/gpu.txt"))"
printf '| %-16s | %-8s | %s\n' step status "last line [time]"
for i in "${!NAMES[@]}"; do
    printf '| %-16s | %-8s | %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${DETAIL[$i]}"
done
for s in "${STATUS[@]}"; do
    case $s in ok|skipped) ;; *) exit 1 ;; esac
done
