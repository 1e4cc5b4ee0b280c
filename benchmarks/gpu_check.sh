#!/usr/bin/env bash
# One-shot GPU check: CUDA unit tests, golden parity on CUDA (float32), bf16/fp16 greedy tokens, kernel
# micro-benchmarks and `visualglm bench` for ChatGLM-6B, VisualGLM-6B and GLM-4V-9B (random full-size
# weights). Everything goes to $OUT (default ./gpu-check-out): one log and, where there is one, one JSON per
# step, plus summary.txt (status and seconds of every step).
#
# Budget: BUDGET_S seconds in all (default 470, for an 8-minute slot). Steps run in priority order, each
# under `timeout` with its own cap cut to what is left; a step that fails or times out is logged and the
# script goes on; a step that no longer fits is skipped (logged). Usage:
#     OUT=/tmp/out bash benchmarks/gpu_check.sh            # GOLDEN_DIR, PYTHON, BUDGET_S optional
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
BUDGET_S="${BUDGET_S:-470}"
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

log() { echo "[$(date +%T)] $*" | tee -a "$SUMMARY"; }

# A Python whose torch sees a GPU: $PYTHON, the repo's venv, then python3.
PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       "$candidate" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        PY="$candidate"; break
    fi
done
if [ -z "$PY" ] && [ "${ALLOW_NO_GPU:-0}" = 1 ]; then PY=.venv/bin/python; fi  # dry run of the script itself
if [ -z "$PY" ]; then
    log "no Python with a CUDA-enabled torch found (tried \$PYTHON, .venv/bin/python, python3, python)"
    exit 2
fi
log "python: $PY"

# Golden vectors: $GOLDEN_DIR, else ../shared/golden (beside the repo), else shared/golden (inside it).
if [ -z "${GOLDEN_DIR:-}" ]; then
    for candidate in ../shared/golden shared/golden; do
        if [ -d "$candidate" ]; then GOLDEN_DIR="$(cd "$candidate" && pwd)"; break; fi
    done
fi
export GOLDEN_DIR="${GOLDEN_DIR:-}"
log "golden: ${GOLDEN_DIR:-none found}"

# step NAME CAP_S COMMAND...: run under timeout (cap cut to the budget left), log to $OUT/NAME.log.
step() {
    local name="$1" cap="$2"; shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then log "SKIP $name (budget spent: ${left}s left)"; return; fi
    [ "$cap" -gt "$left" ] && cap="$left"
    local t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$? dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) log "OK      $name (${dt}s)";;
        124|137) log "TIMEOUT $name (cap ${cap}s)";;
        *) log "FAIL    $name (rc $rc, ${dt}s; see $name.log)";;
    esac
}

# bench NAME CAP_S ARGS...: `visualglm bench --json` on CUDA; the JSON line goes to $OUT/NAME.json.
bench() {
    local name="$1" cap="$2"; shift 2
    step "$name" "$cap" "$PY" -m visualglm bench --device cuda --json --prompt-tokens 128 --new-tokens 64 "$@"
    grep -h '^{' "$OUT/$name.log" > "$OUT/$name.json" 2>/dev/null || rm -f "$OUT/$name.json"
}

step 00_env 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.cuda.get_device_properties(0))'"
step 01_cuda_unit_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/quant/test_cuda_kernels.py \
    tests/generation/test_compiled_step.py
if [ -n "$GOLDEN_DIR" ]; then
    step 02_golden_fp32_cuda 90 env VISUALGLM_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_golden.py
else
    log "SKIP 02_golden_fp32_cuda (no golden directory)"
fi
# The targets, most important first (compiled = CUDA graphs; the warm-up includes compiling).
bench 10_chatglm6b_bf16_b1_compiled 120 --config chatglm-6b --dtype bfloat16 --compile
bench 11_chatglm6b_int4_b1_compiled 100 --config chatglm-6b --dtype bfloat16 --quant 4 --compile
bench 12_glm4v9b_bf16_b1_compiled 120 --config glm-4v-9b --dtype bfloat16 --compile
bench 13_visualglm6b_int4_image 60 --config visualglm-6b --dtype bfloat16 --quant 4 --image
bench 14_chatglm6b_int8_b1_compiled 100 --config chatglm-6b --dtype bfloat16 --quant 8 --compile
step 15_kernels 90 "$PY" -m benchmarks.gpu_kernels --rows 1,8,128 --json
bench 16_glm4v9b_int4_b1_compiled 100 --config glm-4v-9b --dtype bfloat16 --quant 4 --compile
bench 17_glm4v9b_int4_b8_compiled 100 --config glm-4v-9b --dtype bfloat16 --quant 4 --batch 8 --compile
bench 18_glm4v9b_bf16_b8_compiled 100 --config glm-4v-9b --dtype bfloat16 --batch 8 --compile
bench 19_visualglm6b_bf16_image 50 --config visualglm-6b --dtype bfloat16 --image
if [ -n "$GOLDEN_DIR" ]; then
    step 20_golden_bf16_fp16_greedy 60 "$PY" -m benchmarks.gpu_golden_dtypes --golden "$GOLDEN_DIR"
fi
bench 21_chatglm6b_bf16_b1_eager 60 --config chatglm-6b --dtype bfloat16
step 22_chatglm6b_int8_b1_compiled_tuned 120 env VISUALGLM_COMPILE_TUNING=1 "$PY" -m visualglm bench --device cuda \
    --json --prompt-tokens 128 --new-tokens 64 --config chatglm-6b --dtype bfloat16 --quant 8 --compile
grep -h '^{' "$OUT/22_chatglm6b_int8_b1_compiled_tuned.log" > "$OUT/22_chatglm6b_int8_b1_compiled_tuned.json" \
    2>/dev/null || rm -f "$OUT/22_chatglm6b_int8_b1_compiled_tuned.json"
bench 23_visualglm6b_int4_vision_image 60 --config visualglm-6b --dtype bfloat16 --quant 4 --quant-vision --image
log "done in $(( $(date +%s) - START ))s"
