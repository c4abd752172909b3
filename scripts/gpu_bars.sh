#!/usr/bin/env bash
# The GPU numbers the speculative decoding, quantization and server-load bars name, each against its baseline in
# the same run, on any CUDA machine with nano-vllm installed, from the root of a source checkout. Parts (PARTS,
# default all of them, in this order; each fits one 10-minute call on an H100 once the checkpoints exist):
#   spec-small  python -m nanovllm.bench spec: Qwen3-0.6B shape (oracle, n-gram) and SmolLM2-135M (n-gram, oracle)
#   spec-8b     the same for the Qwen3-8B shape (oracle)
#   quant       batch-1 decode at context 128, presets auto,fp8,int8,int4: Qwen3-8B and Qwen3-0.6B shapes
#   load        the server under 32 streaming clients, plain, then 10% JSON-schema + penalty requests; the
#               engine alone on the same mix, with a profile of each kind (benchmarks/constrained_decode.py)
# The Qwen3-8B random checkpoint (16 GB) is written on first use; `PARTS=ckpt` writes it alone (a few minutes).
# Results (JSON) and logs go to $OUT (default ./bench-results/gpu_bars, git-ignored); the last lines of each log
# are printed. Exit status: non-zero when a part failed.
#   PARTS="spec-small quant" bash scripts/gpu_bars.sh
set -uo pipefail
OUT=${OUT:-bench-results/gpu_bars}
PARTS=${PARTS:-spec-small spec-8b quant load}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these are GPU bars')" || exit 2
status=0

run() {  # run NAME COMMAND...: COMMAND's output into $OUT/NAME.log, its last lines printed
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1 || { echo "   failed (exit $?)"; status=1; }
  grep -E "tok/s|speedup|accepted|output tok|TPOT|ITL|error|Error" "$OUT/$name.log" | tail -12
}

for part in $PARTS; do
  case $part in
    ckpt)
      run ckpt python -c "from nanovllm.checkpoints import resolve_model; print(resolve_model('qwen3-8b-random'))" ;;
    spec-small)
      run spec-0.6b python -m nanovllm.bench spec --methods oracle,ngram --num-prompts 4 --max-tokens 96 \
        --out-dir "$OUT/spec-0.6b"
      run spec-smollm2 python -m nanovllm.bench spec --methods ngram,oracle --max-tokens 128 \
        --out-dir "$OUT/spec-smollm2" model=smollm2-135m ;;
    spec-8b)
      run spec-8b python -m nanovllm.bench spec --methods oracle --num-prompts 4 --max-tokens 96 \
        --out-dir "$OUT/spec-8b" model.name=qwen3-8b-random ;;
    quant)
      for model in qwen3-8b-random qwen3-0.6b-random; do
        run "quant-$model" python -m nanovllm.bench latency --presets auto,fp8,int8,int4 --contexts 128 \
          --new-tokens 128 --no-traces --profile-steps 0 --out-dir "$OUT/quant-$model" model.name=$model
      done ;;
    load)
      for fraction in 0 0.1; do
        run "load-$fraction" python benchmarks/serve_load.py --spawn -c 32 -n 256 --max-tokens 128 \
          --constrained-fraction "$fraction" --out "$OUT/load-$fraction.json"
      done
      run constrained-decode python benchmarks/constrained_decode.py --out "$OUT/constrained-decode.json" \
        --profile "$OUT/constrained-profile" ;;
    *) echo "unknown part $part (ckpt, spec-small, spec-8b, quant, load)"; status=1 ;;
  esac
done
echo "== done: exit $status; results in $OUT"
exit $status
