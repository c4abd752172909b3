#!/usr/bin/env bash
# The GPU check of any CUDA machine with nano-vllm installed, run from the root of a source checkout:
#   1. the GPU tests:          python -m pytest -m gpu tests
#   2. batch-1 decode latency: python -m nanovllm.bench all (latency, profile, peers, roofline) at contexts
#                              128 and 4096, 128 new tokens, for $PRESETS (default: the bench's default table)
#   3. the gate:               python -m nanovllm.bench compare against benchmarks/baseline/<gpu>.json
#   4. with PATHS=1:           python -m nanovllm.bench paths (every path's logits against transformers)
# Results and logs go to $OUT (default ./bench-results/gpu_check, git-ignored). Exit status: non-zero when the
# tests fail or the gate finds a regression beyond $THRESHOLD (default 0.05).
#   bash scripts/gpu_check.sh
#   PRESETS=auto,all_fused PATHS=1 bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench-results/gpu_check}
THRESHOLD=${THRESHOLD:-0.05}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this is the GPU check')" || exit 2
status=0

echo "== GPU tests"
python -m pytest -m gpu tests -q -rfE --tb=short -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -30
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== batch-1 decode latency"
bench_dir="$OUT/bench"
rm -rf "$bench_dir"
python -m nanovllm.bench all ${PRESETS:+--presets "$PRESETS"} --skip throughput,ops --no-traces --no-plot \
  --contexts 128,4096 --new-tokens 128 --out-dir "$bench_dir" 2>&1 | tee "$OUT/bench.log" | tail -30
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== gate against the baseline of this GPU"
run=$(find "$bench_dir" -maxdepth 1 -name '*.json' 2>/dev/null | head -1)
if [ -n "$run" ]; then
  python -m nanovllm.bench compare "$run" --threshold "$THRESHOLD" || status=1
else
  echo "no results file in $bench_dir"; status=1
fi

if [ "${PATHS:-0}" = 1 ]; then
  echo "== every path's logits against transformers"
  text=()
  [ -f tests/data/perplexity.txt ] && text=(--text tests/data/perplexity.txt)
  python -m nanovllm.bench paths "${text[@]}" --out-dir "$OUT" || status=1
fi
echo "== done: exit $status; results in $OUT"
exit $status
