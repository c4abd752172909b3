#!/usr/bin/env bash
# One device call for the engine's GPU numbers, from the repo root after `source .gpu/device_env.sh`:
# FlashInfer JIT in the background while the Triton GEMV benchmark tunes; then batch-1 latency per preset
# with the peers; then every path's logits against transformers. Logs and JSON into $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/round}
PRESETS=${PRESETS:-all_fused,flashinfer,flashinfer+fused_mlp,all_fused+fi_attn}
export NANOVLLM_PROGRESS=0 PYTHONUNBUFFERED=1 NANOVLLM_TRITON_TUNE_BUDGET_S=10
start=$SECONDS
stage() { echo "== $1 (t=$((SECONDS - start)) s)"; }
stage "FlashInfer JIT (background) + Triton GEMV benchmark"
python3 kernels/flashinfer/_jit.py > "$OUT/fi_jit.log" 2>&1 &
jit=$!
timeout 150 python3 benchmarks/triton_gemv.py --rows 1 --out "$OUT/triton_gemv.json" > "$OUT/triton_gemv.log" 2>&1
tail -32 "$OUT/triton_gemv.log"
wait $jit; tail -1 "$OUT/fi_jit.log"
stage "latency per preset + peers"
timeout 280 python3 -m nanovllm.bench all --out-dir "$OUT" --presets "$PRESETS" --skip throughput,ops --no-traces \
  --contexts 128,4096 --new-tokens 128 --budget-s 230 > "$OUT/bench.log" 2>&1
grep -v -i warn "$OUT/bench.log" | tail -22
stage "logits of every path against transformers"
timeout $((570 - SECONDS + start)) python3 scripts/gpu_engine_check.py --out "$OUT/engine.json" --check --configs "" \
  > "$OUT/engine.log" 2>&1
grep -E "^(bfloat16|float32) " "$OUT/engine.log"
stage done
