#!/usr/bin/env bash
# Evaluate a DMS model with lm-eval-harness; results, samples and the
# compression the model's caches reached go to MODEL_PATH/eval_results.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash scripts/evaluate.sh MODEL_PATH [TASKS] [extra lm_eval arguments, starting with -...]

Runs lm-eval-harness (through `python -m dms.eval`, which adds the compression
report) on a DMS model directory or hub name:

  accelerate launch -m dms.eval --model hf \
      --model_args pretrained=MODEL_PATH,dtype=bfloat16,trust_remote_code=true,dms_chunked_prefill=4096,dms_kv_cache_dtype=auto \
      --tasks TASKS --metadata '{"max_seq_lengths":[32768]}' --batch_size 2 --device cuda \
      --include_path <dms/eval/tasks> --output_path MODEL_PATH/eval_results --log_samples [extra...]

  TASKS     comma-separated lm-eval tasks (default niah_single_2, RULER's
            single needle in Paul Graham essays). dms_passkey is the offline
            task shipped with dms (no download).
  extra     appended last, so they override the defaults above, e.g.
            --limit 50, or --metadata '{"max_seq_lengths":[4096,32768]}'.

Environment (defaults in brackets):
  MAX_SEQ_LENGTHS   comma-separated context lengths for --metadata [32768]
  BATCH_SIZE        [2]
  DTYPE             [bfloat16 on a GPU, float32 on the CPU]
  CHUNKED_PREFILL   dms_chunked_prefill, tokens per prefill chunk [4096]
  KV_CACHE_DTYPE    dms_kv_cache_dtype: auto (the model's dtype), fp8_e4m3
                    or fp8_e5m2 (FP8 cache pages) [auto]
  OUTPUT_DIR        [MODEL_PATH/eval_results]
  DEVICE            [cuda when torch sees a GPU, else cpu (with a warning)]
  ACCELERATE_ARGS   extra `accelerate launch` options, e.g. "--num_processes 8" []
  PYTHON            interpreter [python]

Results: OUTPUT_DIR/<model>/results_<date>.json (with "dms_compression"),
samples_<task>_<date>.jsonl, and compression_<date>.json (all tokens seen /
stored over the caches of the run, per layer, and the mean of per-row ratios).

RULER's tasks need nltk, wonderwords and scipy (lm-eval[ruler], part of
dms-kv[eval]). Offline (no hub), these run: dms_passkey (shipped with dms),
niah_single_1, niah_multikey_2 and niah_multikey_3 (their haystacks are made
locally), e.g.
  MAX_SEQ_LENGTHS=4096,32768 bash scripts/evaluate.sh MODEL_PATH niah_single_1,dms_passkey
niah_single_2 (the default), niah_single_3, niah_multikey_1, niah_multivalue
and niah_multiquery read the hub dataset baber/paul_graham_essays;
ruler_qa_squad and ruler_qa_hotpot download their data; run them once with
network (later runs can set HF_DATASETS_OFFLINE=1). The others: ruler_vt,
ruler_cwe, ruler_fwe, or the group `ruler`. A failed download stops with a
message that lists the offline tasks.
EOF
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -lt 1 ]] && exit 2
    exit 0
fi
MODEL_PATH="$1"
shift
TASKS="niah_single_2"
if [[ $# -gt 0 && "$1" != -* ]]; then  # TASKS is optional: extra arguments may follow MODEL_PATH at once
    TASKS="$1"
    shift
fi

PYTHON="${PYTHON:-python}"
if [[ -z "${DEVICE:-}" ]]; then
    if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        DEVICE=cuda
    else
        DEVICE=cpu
    fi
fi
if [[ "$DEVICE" == cpu ]]; then
    echo "evaluate.sh: WARNING: no CUDA GPU found: evaluating on the CPU in float32, one process;" \
         "long contexts (32K) will be very slow there" >&2
    DTYPE="${DTYPE:-float32}"
    LAUNCH=("$PYTHON" -m dms.eval)
else
    DTYPE="${DTYPE:-bfloat16}"
    # shellcheck disable=SC2206
    LAUNCH=(accelerate launch ${ACCELERATE_ARGS:-} -m dms.eval)
fi

OUTPUT_DIR="${OUTPUT_DIR:-${MODEL_PATH%/}/eval_results}"
TASKS_DIR="$("$PYTHON" -c "import dms.eval; print(dms.eval.TASKS_DIR)")"
LENGTHS="${MAX_SEQ_LENGTHS:-32768}"

set -x
"${LAUNCH[@]}" \
    --model hf \
    --model_args "pretrained=${MODEL_PATH},dtype=${DTYPE},trust_remote_code=true,dms_chunked_prefill=${CHUNKED_PREFILL:-4096},dms_kv_cache_dtype=${KV_CACHE_DTYPE:-auto}" \
    --tasks "$TASKS" \
    --metadata "{\"max_seq_lengths\":[${LENGTHS}]}" \
    --batch_size "${BATCH_SIZE:-2}" \
    --device "$DEVICE" \
    --include_path "$TASKS_DIR" \
    --output_path "$OUTPUT_DIR" \
    --log_samples \
    "$@"
