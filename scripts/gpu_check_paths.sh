#!/usr/bin/env bash
# Every execution path's teacher-forced logits against transformers (fp32 on the CPU), after building the
# FlashInfer JIT modules; then the throughput workload. Into $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/paths}
# Correctness needs no tuning: Triton kernels take their heuristic configs (or the committed tuned ones).
export NANOVLLM_PROGRESS=0 PYTHONUNBUFFERED=1 NANOVLLM_TRITON_TUNE=0
python3 kernels/flashinfer/_jit.py > "$OUT/fi_jit.log" 2>&1
timeout 260 python3 scripts/gpu_engine_check.py --out "$OUT/engine.json" --check --configs "" > "$OUT/engine.log" 2>&1
grep -E "^(bfloat16|float32) " "$OUT/engine.log"
unset NANOVLLM_TRITON_TUNE
timeout 150 python3 -m nanovllm.bench throughput --out-dir "$OUT" --presets all_fused --no-plot > "$OUT/tp.log" 2>&1
grep -v -i warn "$OUT/tp.log" | tail -8
