"""One GPU call's worth of engine checks: CUDA-graph vs eager correctness, then batch-1 decode speed per
configuration. Prints a table last; writes JSON to --out.

python3 scripts/gpu_engine_check.py --out $OUT/engine.json [--configs eager,graphs,compile_ops,...]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.teacher_forcing import teacher_forced_logits
from nanovllm.speed import measure

CONFIGS = {
    "eager_nographs": dict(enforce_eager=True),
    "graphs": dict(),
    "graphs_compile_ops": dict(kernels={"default": "compile"}),
    "graphs_compile_model": dict(compile_model=True),
}


def correctness(base_kwargs) -> dict:
    """Teacher-forced logits and greedy outputs: CUDA graphs against eager on the same engine weights."""
    torch.manual_seed(0)
    prompt = torch.randint(0, 151000, (50,)).tolist()
    forced = torch.randint(0, 151000, (32,)).tolist()
    out = {}
    ref = None
    for name in ("eager_nographs", "graphs"):
        llm = LLM("default", **base_kwargs, **CONFIGS[name])
        logits = teacher_forced_logits(llm.engine, prompt, forced)
        greedy = llm.generate([prompt, prompt[:7], prompt[:31]],
                              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        if ref is None:
            ref = (logits, [g["token_ids"] for g in greedy])
        else:
            err = ((logits - ref[0]).norm() / ref[0].norm()).item()
            agree = (logits.argmax(-1) == ref[0].argmax(-1)).float().mean().item()
            out = dict(rel_err=err, argmax_agree=agree, greedy_equal=[g["token_ids"] for g in greedy] == ref[1])
        llm.close()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--decode-tokens", type=int, default=256)
    args = p.parse_args()
    base = dict(max_model_len=4096, max_num_seqs=64)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        results["graphs_vs_eager"] = correctness(base)
    except Exception:
        results["graphs_vs_eager"] = {"error": traceback.format_exc()}
        print(results["graphs_vs_eager"]["error"])
    rows = []
    for name in args.configs.split(","):
        t0 = time.perf_counter()
        try:
            llm = LLM("default", **base, **CONFIGS[name])
            build = time.perf_counter() - t0
            speed = measure(llm, args.decode_tokens, 1024, 2, 3)
            rows.append(dict(config=name, build_s=build, timings=llm.engine.runner.timings,
                             kv_blocks=llm.engine.runner.num_blocks, **speed))
            llm.close()
        except Exception:
            rows.append(dict(config=name, error=traceback.format_exc()))
            print(rows[-1]["error"])
    results["speed"] = rows
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(json.dumps(results["graphs_vs_eager"]))
    print(f"{'config':24s} {'decode tok/s':>12s} {'ms/tok':>8s} {'ttft ms':>8s} {'prefill tok/s':>14s} {'build s':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:24s} ERROR {r['error'].splitlines()[-1]}")
        else:
            print(f"{r['config']:24s} {r['decode_tok_s']:12.1f} {r['decode_ms_per_token']:8.3f} {r['ttft_ms']:8.1f} "
                  f"{r['prefill_tok_s']:14.0f} {r['build_s']:8.1f}")


if __name__ == "__main__":
    main()
