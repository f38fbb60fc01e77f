#!/usr/bin/env bash
# gpu_check.sh - everything CUDA, in one run on a lent GPU machine (the
# `device` tool), correctness first and speed last:
#   1. build with DMS_CUDA=1 (no network there: --no-build-isolation
#      --no-deps); a build without CUDA kernels, or no visible GPU, stops here
#   2. self-check (python -m dms) and the CUDA tests (-m cuda: CUDA against
#      the CPU kernels and float64 at real shapes)
#   3. compute-sanitizer: memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1, small
#      selections), racecheck and synccheck on cases with several key tiles
#      and on the cache kernels
#   4. benchmarks, short configurations, each with its own time limit; they
#      start only after every check has run
# A summary table is printed last; every log is in one tarball,
# $OUT/gpu_check_logs.tar.gz.
#
# Usage (from the repository root):  bash scripts/gpu_check.sh
#   OUT                where logs go (default /tmp/dms_gpu_check; the device
#                      tool brings $OUT back)
#   GPU_CHECK_BUDGET   seconds for the whole run (default 540)
#   GPU_CHECK_DRY=1    the same steps without a GPU: pytest selections are
#                      collected (not run), benchmarks print their --help,
#                      CUDA-only steps say they are skipped; CI runs this so
#                      the script cannot rot
#   PYTHON             interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dms_gpu_check}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-540}
declare -a NAMES STATUS DETAIL
FAILED=0

record() {  # record NAME STATUS DETAIL
    NAMES+=("$1"); STATUS+=("$2"); DETAIL+=("$3")
    case $2 in ok|skipped|dry) ;; *) FAILED=1 ;; esac
}

# step NAME LIMIT_S KIND COMMAND...   KIND: check (runs first, always), bench
# (runs only if time is left after the checks), pytest (a check whose dry
# run collects the selection instead of running it)
step() {
    local name=$1 limit=$2 kind=$3
    shift 3
    local log="$LOGS/$name.log"
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 15 ]; then
        record "$name" skipped "out of time budget (${BUDGET}s)"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local cmd=("$@")
    if [ "$DRY" = 1 ]; then
        case $kind in
            pytest) cmd=("$@" --collect-only -q) ;;
            bench) cmd=("$1" "$2" --help) ;;
            *) ;;
        esac
    fi
    echo "=== $name: ${cmd[*]}"
    local start=$SECONDS
    timeout "$limit" "${cmd[@]}" >"$log" 2>&1
    local rc=$?
    tail -n 15 "$log"
    local last
    last="$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-90) [$((SECONDS - start))s]"
    if [ $rc -eq 0 ]; then
        record "$name" "$([ "$DRY" = 1 ] && echo dry || echo ok)" "$last"
    elif [ $rc -eq 124 ]; then
        record "$name" "TIMEOUT" "after ${limit}s: $last"
    else
        record "$name" "FAIL($rc)" "$last"
    fi
    return $rc
}

skip() {  # skip NAME REASON
    echo "=== $1: skipped ($2)"
    record "$1" skipped "$2"
}

finish() {
    tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$OUT" logs 2>/dev/null
    echo
    echo "=== benchmark tables"
    cat "$LOGS"/bench_*.log 2>/dev/null | grep -E '^(\||machine:|gate|attn_train|decode|prefill)'
    echo
    echo "=== summary ($(cat "$LOGS/gpu.txt" 2>/dev/null || echo 'no GPU')); logs: $OUT/gpu_check_logs.tar.gz"
    printf '| %-18s | %-9s | %s\n' step status "last line [time]"
    for i in "${!NAMES[@]}"; do
        printf '| %-18s | %-9s | %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${DETAIL[$i]}"
    done
    exit "$FAILED"
}

# ---- 1. build -----------------------------------------------------------
if [ "$DRY" = 1 ]; then
    echo "GPU_CHECK_DRY=1: no GPU; the build and the CUDA runs are skipped, selections are collected" \
        | tee "$LOGS/gpu.txt"
    skip build "dry run (the installed build is used)"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/gpu.txt"
    # Build for this GPU only (half the nvcc time of the default "80;90").
    if [ -z "${DMS_CUDA_ARCHS:-}" ]; then
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
        case $cap in ''|*[!0-9]*) ;; *) export DMS_CUDA_ARCHS=$cap ;; esac
    fi
    echo "DMS_CUDA_ARCHS=${DMS_CUDA_ARCHS:-80;90 (default)}"
    export DMS_CUDA=1  # a missing nvcc is an error, not a CPU-only build
    if ! step build 400 check "$PY" -m pip install --no-build-isolation --no-deps -e .; then
        step build_inplace 400 check "$PY" setup.py build_ext --inplace
    fi
fi
step cuda_present 60 check "$PY" -c '
import sys, dms
info = dms.build_info()
dry = sys.argv[1] == "1"
print("cuda kernels:", info["cuda"], "| visible devices:", info.get("cuda_device_count"), "| archs:",
      info.get("cuda_archs"))
if not dry and not (info["cuda"] and info.get("cuda_device_count", 0) > 0):
    sys.exit("gpu_check: STOP: this build has no CUDA kernels or sees no GPU; nothing below would test CUDA")
' "$DRY" || finish

# ---- 2. checks ----------------------------------------------------------
step selfcheck 120 check "$PY" -m dms
# -m cuda: every CUDA test (skips cleanly where an optional package is missing)
step cuda_tests 240 pytest "$PY" -m pytest -q -p no:cacheprovider -m cuda tests

# ---- 3. compute-sanitizer -----------------------------------------------
CS=$(command -v compute-sanitizer || true)
[ -z "$CS" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && \
    CS="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
SMALL=(tests/test_gate.py tests/test_attn_train.py tests/test_cache.py tests/test_attn_decode.py tests/test_nan.py)
MEM_K="cuda and (T1D8 or B2H1G2T5 or T113 or nan or turn_pattern and chunks1 or reduced_precision and short \
or D64-G5-P16)"
# several key tiles (T >= 130: the cp.async double buffer is reused), the
# cache kernels (append, chunked prefill, decode), both page precisions
RACE_K="cuda and (T130D64w1pad and float32 or tensor_core and T130 or turn_pattern and chunks3 \
or reduced_precision and tiles or D64-G5-P16 and bfloat16)"
if [ -z "$CS" ] && [ "$DRY" != 1 ]; then
    skip memcheck "compute-sanitizer not on PATH nor in \${CUDA_HOME:-/usr/local/cuda}/bin"
    skip racecheck "compute-sanitizer not found"
    skip synccheck "compute-sanitizer not found"
else
    CS=${CS:-compute-sanitizer}
    sanitize() {  # sanitize NAME LIMIT TOOL -k SELECTION
        local name=$1 limit=$2 tool=$3 sel=$4
        if [ "$DRY" = 1 ]; then
            step "$name" "$limit" pytest "$PY" -m pytest -q -p no:cacheprovider "${SMALL[@]}" -k "$sel"
        else
            step "$name" "$limit" check env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CS" --tool "$tool" \
                --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider "${SMALL[@]}" -k "$sel"
        fi
    }
    sanitize memcheck 150 memcheck "$MEM_K"
    sanitize racecheck 120 racecheck "$RACE_K"
    sanitize synccheck 90 synccheck "$RACE_K"
fi

# ---- 4. benchmarks (short; only after every check) ------------------------
step bench_decode 60 bench "$PY" bench/decode.py --device cuda --contexts 4096,32768
step bench_attn_train 90 bench "$PY" bench/attention_train.py --device cuda --seq 4096 --dtype bfloat16 --no-flex
step bench_prefill 60 bench "$PY" bench/prefill.py --device cuda --seq 16384 --chunk 4096
step bench_gate 30 bench "$PY" bench/gate.py --device cuda --dtype bfloat16

finish
