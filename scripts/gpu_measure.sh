#!/usr/bin/env bash
# One device call of measurements, from the repo root after `source .gpu/device_env.sh`. Stages are chosen
# by STAGES (space-separated, in order); each has its own time limit and prints its rows as it goes.
#   run        python -m nanovllm.run -m '+kernels=baseline,compile' (the README's main job, as a sweep)
#   latency    batch-1 latency per preset (LATENCY_PRESETS) at contexts 128/4096, with peers and profile
#   sync       the same for all_fused with engine.async_scheduling=false (no peers, no profile)
#   fi_latency the flashinfer preset's latency (its build is slow: a stage of its own)
#   throughput nano-vllm's workload (THROUGHPUT_PRESET), again without async scheduling when THROUGHPUT_SYNC=1
#              and without detokenization when THROUGHPUT_NO_TEXT=1
#   gemv       benchmarks/triton_gemv.py (GEMV_ARGS): TB/s per projection, every Triton backend of each fused site,
#              decode attention (two-kernel and one-pass), a whole layer (sites vs the persistent kernel); it
#              tunes the batch-1 configs
#   paths      every path's teacher-forced logits against transformers (scripts/gpu_engine_check.py), within
#              PATHS_LIMIT_S (330; 200 stopped before the FlashInfer rows)
#   models     batch-1 tok/s of every model family (benchmarks/models_gpu.py) with FlashInfer
#   serve      the server under N streaming clients (benchmarks/serve_load.py)
#   tests      pytest -m gpu (TESTS: files)
#   profile    python -m nanovllm.bench profile of each of PROFILE_PRESETS (kernels per step, top kernels),
#              with PROFILE_ARGS (e.g. "--batch 256 --context 512": the throughput regime)
# FlashInfer's JIT runs first in the background (the stages that need it wait for it). Everything lands in
# /tmp/m and is packed into $OUT/measure.tgz at exit (the device returns 8 files at most).
set -uo pipefail
STAGES=${STAGES:-"run tests latency sync throughput"}
LATENCY_PRESETS=${LATENCY_PRESETS:-all_fused,all_fused+onepass}
THROUGHPUT_PRESET=${THROUGHPUT_PRESET:-all_fused+fi_prefill}
# models: FlashInfer attention (JIT_ARGS="--head-dim 64,128,256 --windows" builds what the families need), the
# Triton GEMVs and fused sites elsewhere (a family a site does not fit keeps the native op)
MODELS_KERNELS=${MODELS_KERNELS:-'{"ops": {"linear": "triton", "norm_qkv": "triton", "qk_norm_rope": "triton", "attn_out": "triton", "mlp": "triton", "lm_head_sample": "triton", "attention_prefill": "flashinfer", "attention_decode": "flashinfer", "moe": "triton"}}'}
TESTS=${TESTS:-tests/test_triton_gpu.py tests/test_flashinfer.py tests/test_sdpa.py}
LOG=/tmp/m
mkdir -p "$LOG"
# A stage past its limit gets SIGABRT first: faulthandler then prints where every thread was.
export NANOVLLM_PROGRESS=0 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NANOVLLM_TRITON_TUNE_BUDGET_S=${NANOVLLM_TRITON_TUNE_BUDGET_S:-8}
start=$SECONDS
trap 'find ~/.cache/flashinfer -name flashinfer_jit.log -exec cp {} "$LOG/" \; 2>/dev/null; tar czf "$OUT/measure.tgz" -C /tmp m 2>/dev/null; cp "$LOG/summary.txt" "$OUT/" 2>/dev/null' EXIT
say() { echo "$*" | tee -a "$LOG/summary.txt"; }
stage() { say "== $1 (t=$((SECONDS - start)) s)"; }
left() { echo $(( ${DEADLINE:-560} - SECONDS + start )); }   # seconds left in this call
limit() { local l; l=$(left); echo $(( $1 < l ? $1 : (l > 5 ? l : 5) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG/summary.txt"

JIT_ARGS=${JIT_ARGS:-""}
( python3 kernels/flashinfer/_jit.py $JIT_ARGS > "$LOG/fi_jit.log" 2>&1; echo done >> "$LOG/fi_jit.log" ) &
wait_jit() { while ! grep -q '^done' "$LOG/fi_jit.log" 2>/dev/null; do sleep 2; done; say "$(grep built "$LOG/fi_jit.log" | cut -c1-60)"; }

bench() {  # bench(name, seconds, args...): python -m nanovllm.bench with a budget inside its limit
  local name=$1 secs; secs=$(limit "$2"); shift 2
  timeout -s ABRT -k 10 "$secs" python3 -m nanovllm.bench "$@" --out-dir "$LOG/$name" --budget-s $((secs - 40)) \
    > "$LOG/$name.log" 2>&1
  grep -E "tok/s|per decode step|failed|skip" "$LOG/$name.log" | grep -v -i warn | cut -c1-160 | tee -a "$LOG/summary.txt"
}

for s in $STAGES; do
  stage "$s"
  case $s in
    run)
      timeout -s ABRT -k 10 "$(limit 240)" python3 -m nanovllm.run -m '+kernels=baseline,compile' device=cuda \
        hydra.sweep.dir="$LOG/run_sweep" > "$LOG/run.log" 2>&1
      say "exit $?"
      python3 experiments/aggregate.py "$LOG/run_sweep" > "$LOG/run_table.md" 2>&1
      cut -c1-200 "$LOG/run_table.md" | tee -a "$LOG/summary.txt" ;;
    latency)
      case $LATENCY_PRESETS in *fi*|*flashinfer*) wait_jit ;; esac  # FlashInfer presets only
      bench latency 200 all --presets "$LATENCY_PRESETS" --skip throughput,ops --no-traces --contexts 128,4096 \
        --new-tokens 128 ;;
    sync)
      bench sync 90 latency --presets all_fused --contexts 128,4096 --new-tokens 128 engine.async_scheduling=false ;;
    fi_latency)
      wait_jit
      bench fi_latency 200 latency --presets flashinfer --contexts 128,4096 --new-tokens 128 ;;
    throughput)
      wait_jit
      bench throughput "${THROUGHPUT_LIMIT_S:-150}" throughput --presets "$THROUGHPUT_PRESET" --no-plot
      if [ "${THROUGHPUT_NO_TEXT:-0}" = 1 ]; then  # token ids only, as nano-vllm's bench.py
        bench throughput_no_text 120 throughput --presets "$THROUGHPUT_PRESET" --no-plot --no-detokenize
      fi
      if [ "${THROUGHPUT_SYNC:-0}" = 1 ]; then
        bench throughput_sync 100 throughput --presets "$THROUGHPUT_PRESET" --no-plot engine.async_scheduling=false
      fi ;;
    gemv)
      # shellcheck disable=SC2086
      timeout -s ABRT -k 10 "$(limit 200)" python3 benchmarks/triton_gemv.py ${GEMV_ARGS:---rows 1} --out "$LOG/triton_gemv.json" \
        > "$LOG/triton_gemv.log" 2>&1
      say "exit $?"; grep -v -i "warn\|tuned" "$LOG/triton_gemv.log" | cut -c1-160 | tee -a "$LOG/summary.txt" ;;
    paths)
      wait_jit
      NANOVLLM_TRITON_TUNE=0 timeout -s ABRT -k 10 "$(limit "${PATHS_LIMIT_S:-330}")" \
        python3 scripts/gpu_engine_check.py --out "$LOG/engine.json" \
        --check --configs "" > "$LOG/engine.log" 2>&1
      say "exit $?"; grep -E "^(bfloat16|float32) |PASS|FAIL" "$LOG/engine.log" | cut -c1-200 | tee -a "$LOG/summary.txt" ;;
    models)
      wait_jit
      timeout -s ABRT -k 10 "$(limit 200)" python3 benchmarks/models_gpu.py --out "$LOG/models.json" \
        --kernels "$MODELS_KERNELS" \
        > "$LOG/models.log" 2>&1
      say "exit $?"; grep -E "tok/s|Error" "$LOG/models.log" | cut -c1-200 | tee -a "$LOG/summary.txt" ;;
    serve)
      wait_jit
      timeout -s ABRT -k 10 "$(limit 150)" python3 benchmarks/serve_load.py --spawn -c 32 -n 256 --max-tokens 128 \
        --out "$LOG/load.json" -- '+kernels=[all_fused,fi_prefill]' > "$LOG/serve.log" 2>&1
      say "exit $?"; grep -v -i warn "$LOG/serve.log" | tail -12 | cut -c1-200 | tee -a "$LOG/summary.txt" ;;
    profile)
      for p in ${PROFILE_PRESETS:-compile baseline}; do
        # shellcheck disable=SC2086
        timeout -s ABRT -k 10 "$(limit 200)" python3 -m nanovllm.bench profile --preset "$p" ${PROFILE_ARGS:-} \
          --out-dir "$LOG/profile_$p" > "$LOG/profile_$p.log" 2>&1
        say "profile $p: exit $?"; grep -v -i "warn\|online softmax\|split the reduction\|important use case" \
          "$LOG/profile_$p.log" | tail -40 | cut -c1-180 | tee -a "$LOG/summary.txt"
      done ;;
    tests)
      case $TESTS in *flashinfer*) wait_jit ;; esac
      # shellcheck disable=SC2086
      timeout -s ABRT -k 10 "$(limit 240)" python3 -m pytest -m gpu $TESTS -q -rfE --tb=short -p no:cacheprovider \
        > "$LOG/tests.log" 2>&1
      say "exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$LOG/tests.log" | tail -20 | cut -c1-200 \
        | tee -a "$LOG/summary.txt" ;;
  esac
done
stage done
