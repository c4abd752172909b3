"""Where an engine's GPU memory goes (weights, KV cache, activations, kernel workspaces, the rest), and with
--decode-steps N whether decode steps allocate device memory: the CUDA caching allocator's allocation and
segment counters before and after N steps of a running engine, for greedy batch 1 and temperature-sampled
batch 8 and top-k/top-p batch 8 (all must be unchanged: the CUDA graphs take their inputs in preallocated
buffers), and for information top-k/top-p batch 32 (above cuda_graphs.FILTERED_MAX_ROWS: sampled outside the
graph, its sampler allocates; run when max_num_seqs >= 32).

    python benchmarks/memory_report.py [--model default] [--kernels all_fused] [--decode-steps 1000]
        [--engine-arg max_num_seqs=64 ...] [--out memory_report.json]

Prints two tables and writes JSON rows (one `memory` row, one `decode_allocations` row per case). Exits 1
when a required case allocated.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch
import yaml

from nanovllm import LLM, SamplingParams
from nanovllm.engine import decode_allocations

GIB = 2**30
CASES = (  # (name, batch, params, must be allocation-free)
    ("greedy", 1, SamplingParams(temperature=0.0), True),
    ("sampled", 8, SamplingParams(temperature=0.8), True),
    ("top_k_top_p", 8, SamplingParams(temperature=0.8, top_k=50, top_p=0.9), True),
    ("top_k_top_p", 32, SamplingParams(temperature=0.8, top_k=50, top_p=0.9), False),
)


def engine_args(args) -> dict:
    kw = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        try:
            kw[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kw[key] = value
    if args.kernels:
        path = Path(__file__).resolve().parents[1] / "configs" / "kernels" / f"{args.kernels}.yaml"
        if not path.is_file():
            raise SystemExit(f"no kernel preset {args.kernels!r} (configs/kernels/*.yaml)")
        kw["kernels"] = yaml.safe_load(path.read_text())
    kw.setdefault("max_model_len", max(4096, args.decode_steps + 64))
    return kw


def print_memory(report) -> None:
    print(f"{'memory':<28}{'GiB':>10}")
    for kind, nbytes in report.gauges().items():
        print(f"{kind:<28}{nbytes / GIB:>10.3f}")
    for name, nbytes in report.workspaces.items():
        print(f"  workspace {name:<17}{nbytes / GIB:>10.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--kernels", default=None, help="a kernel preset of configs/kernels (default: auto)")
    p.add_argument("--decode-steps", type=int, default=0, help="count allocations over this many decode steps")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="an engine argument")
    p.add_argument("--out", type=Path, default=Path("memory_report.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memory_report.py measures the CUDA allocator: it needs a GPU")
    gpu = torch.cuda.get_device_name()
    rows, failed = [], []
    with LLM(args.model, **engine_args(args)) as llm:
        report = llm.engine.runner.memory
        print(f"{gpu}, {args.model}, kernels {args.kernels or 'auto'}")
        print_memory(report)
        rows.append(dict(kind="memory", gpu=gpu, model=args.model, kernels=args.kernels or "auto", **report.as_dict()))
        if args.decode_steps:
            print(f"\n{'case':<14}{'batch':>6}{'mode':>12}{'graph':>7}{'steps':>7}{'d alloc':>9}{'d segm':>8}  ok")
        cases = [c for c in CASES if c[1] <= llm.config.max_num_seqs] if args.decode_steps else []
        for name, batch, params, required in cases:
            r = decode_allocations.measure(llm.engine, batch, params, args.decode_steps)
            d = r.delta
            ok = r.allocation_free and r.graph
            if required and not ok:
                failed.append(name)
            print(f"{name:<14}{batch:>6}{r.sampling:>12}{r.graph!s:>7}{r.steps:>7}{d['allocations']:>9}"
                  f"{d['segments']:>8}  {'yes' if ok else 'NO' if required else '(not required)'}")
            rows.append(dict(kind="decode_allocations", gpu=gpu, model=args.model, kernels=args.kernels or "auto",
                             case=name, batch=batch, sampling=r.sampling, graph=r.graph, steps=r.steps,
                             allocations_delta=d["allocations"], segments_delta=d["segments"], required=required,
                             allocation_free=r.allocation_free))
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {args.out}" + (f"; allocating decode steps: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
