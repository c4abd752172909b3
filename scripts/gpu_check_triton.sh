#!/usr/bin/env bash
# The Triton kernels' GPU check in one device call, from the repo root, after `source .gpu/device_env.sh`:
#   1. benchmarks/triton_gemv.py: per-projection TB/s (cuBLAS vs Triton, with and without PDL), the fused
#      sites and decode attention; it tunes the batch-1 configs into $OUT/triton_cache/<gpu>.json
#      (worth committing as kernels/triton/tuned/<gpu>.json: later runs then skip tuning)
#   2. tests/test_triton_gpu.py (-m gpu), reusing those configs and Triton's compile cache
# If the benchmark fails, it is re-run with PDL off (NANOVLLM_TRITON_PDL=0) and the tests run that way too.
# Into $OUT: gpu.txt, triton_gemv.{log,json}, test_triton_gpu.log, triton_cache/<gpu>.json. About 6 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/triton_check}
mkdir -p "$OUT/triton_cache"
export NANOVLLM_TRITON_CACHE="$OUT/triton_cache"
export NANOVLLM_TRITON_TUNE_BUDGET_S=${NANOVLLM_TRITON_TUNE_BUDGET_S:-15}  # per (op, shape) key
export PYTHONUNBUFFERED=1
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu.txt" 2>&1
timeout 190 python3 benchmarks/triton_gemv.py --out "$OUT/triton_gemv.json" 2>&1 | tee "$OUT/triton_gemv.log"
bench=${PIPESTATUS[0]}
echo "benchmark: exit $bench after $((SECONDS - start)) s"
if [ "$bench" != 0 ]; then
  export NANOVLLM_TRITON_PDL=0
  echo "=== benchmark failed: again with NANOVLLM_TRITON_PDL=0 ===" | tee -a "$OUT/triton_gemv.log"
  timeout $((300 - SECONDS + start > 60 ? 300 - SECONDS + start : 60)) python3 benchmarks/triton_gemv.py \
    --out "$OUT/triton_gemv.json" 2>&1 | tee -a "$OUT/triton_gemv.log"
  bench=${PIPESTATUS[0]}
fi
left=$((350 - SECONDS + start))
timeout $((left > 90 ? left : 90)) python3 -m pytest -m gpu tests/test_triton_gpu.py -q -s -rfE --durations=12 \
  -p no:cacheprovider > "$OUT/test_triton_gpu.log" 2>&1
tests=$?
grep -E "^(FAILED|ERROR)|passed|failed|all_fused|fused greedy|Error" "$OUT/test_triton_gpu.log" | tail -40
echo "tests: exit $tests (124: timed out); PDL ${NANOVLLM_TRITON_PDL:-on}; total $((SECONDS - start)) s; logs in $OUT"
[ "$bench" = 0 ] && [ "$tests" = 0 ]
