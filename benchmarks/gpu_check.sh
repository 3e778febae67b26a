#!/usr/bin/env bash
# The CUDA checks in one run of about 10 minutes: GPU tests, then the CUDA benchmarks.
#
#   bash benchmarks/gpu_check.sh            # output under $OUT (default ./gpu_out)
#
# Each step runs under `timeout` (its limit can be overridden: GPU_TESTS_S=300 bash ...), its
# output is tee'd into $OUT/<step>.log, and $OUT/summary.txt lists every step's exit status
# and duration (124: the step ran out of time). A step that fails does not stop the others;
# a step that would start after TOTAL_S seconds is skipped (listed as such). Steps run in
# order of importance: tests, overhead bar, graph-capture bars, automatic micro-batching.
set -u

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
TOTAL_S="${TOTAL_S:-600}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME LIMIT_S COMMAND...
    local name="$1" limit="$2"
    shift 2
    local now elapsed left
    now=$(date +%s)
    elapsed=$((now - START))
    left=$((TOTAL_S - elapsed))
    if [ "$left" -le 10 ]; then
        printf '%-22s skipped (total budget of %ss spent)\n' "$name" "$TOTAL_S" | tee -a "$SUMMARY"
        return
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    printf '%-22s rc=%-4s %4ss  (limit %ss)\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" | tee -a "$SUMMARY"
}

step environment 30 bash -c 'nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
  python -c "import torch, sys; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda);
print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"none\")"'

# All 45 GPU tests (each needs CUDA; without one they skip with the reason, which -rs lists).
step gpu-tests "${GPU_TESTS_S:-150}" python -m pytest tests/gpu -q -rs -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml"

# Overhead against the hand-written loop on the 124M GPT (bar: <= 1.01 for time and memory).
# 7 alternating rounds instead of 15: enough for the median on an idle GPU.
step overhead-cuda "${OVERHEAD_S:-130}" python benchmarks/overhead.py --device cuda --rounds 7

# Graph-captured micro-steps, one case per step (so that the first case's figures survive a
# time-out in the second); --quick: 5 timed updates per variant after 3 warm-up.
step graphs-gpt-20m "${GRAPHS_SMALL_S:-110}" python benchmarks/graphs.py --case gpt-20m --quick
step graphs-gpt-124m "${GRAPHS_LARGE_S:-120}" python benchmarks/graphs.py --case gpt-124m --quick

# Automatic micro-batching under a 16 GiB cap on the 124M GPT, batch 64 x 1024 tokens, against the
# fixed sizes from 4 up (sizes 1 and 2 are the slowest and never the best on this case).
step auto-microbatch "${AUTO_S:-120}" python benchmarks/auto_microbatch.py --sizes 4,8,16,32,64 --updates 6 \
    --timeout 60

echo "=== summary (total $(( $(date +%s) - START ))s; logs in $OUT)"
cat "$SUMMARY"
