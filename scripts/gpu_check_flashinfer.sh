#!/usr/bin/env bash
# The FlashInfer / SDPA backends on the GPU in one device call (about 5-6 min, most of it FlashInfer's JIT):
# build the JIT modules in one parallel ninja run, the GPU tests, then the micro-benchmarks.
# From the repo root, after `source .gpu/device_env.sh`; logs and JSON go to $OUT.
#   bash scripts/gpu_check_flashinfer.sh
set -uo pipefail
OUT=${OUT:-/tmp/fi_check}
mkdir -p "$OUT"
t0=$(date +%s)
stage() { echo; echo "== $1 (t=$(( $(date +%s) - t0 )) s)"; }

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, flashinfer; print('torch', torch.__version__, 'flashinfer', flashinfer.__version__)"

# Not under `timeout`: killing it would orphan ninja, which then races the tests' own builds.
stage "FlashInfer JIT: every module the plugins use (bf16, head_dim 128, with and without a window)"
python3 kernels/flashinfer/_jit.py --windows 2>&1 | tail -20 | tee "$OUT/fi_jit.log"

stage "GPU tests"
timeout 180 python3 -m pytest -m gpu tests/test_flashinfer.py tests/test_sdpa.py -q --maxfail=10 --tb=short \
  -p no:cacheprovider 2>&1 | tee "$OUT/fi_tests.log"

stage "micro-benchmark: batch-1 decode attention, 28 layers in one CUDA graph"
timeout 60 python3 benchmarks/fi_micro.py --out "$OUT/fi_micro.json" 2>&1 | tee "$OUT/fi_micro.log"

stage "shared-prefix batch decode: flashinfer vs flashinfer_cascade"
timeout 45 python3 benchmarks/shared_prefix.py --out "$OUT/shared_prefix.json" 2>&1 | tee "$OUT/shared_prefix.log"

stage "FlashInfer JIT cache (a module missing from _jit.py's list shows up here as built at run time)"
python3 -c "import os; from flashinfer.jit import env; d = env.FLASHINFER_JIT_DIR; print(d); print(*sorted(os.listdir(d)), sep='\n')" 2>&1 | tee -a "$OUT/fi_jit.log"

stage "done"
