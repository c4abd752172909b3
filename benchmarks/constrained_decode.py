"""The engine's cost of requests whose sampling reads the host's state, without the server: one LLM decodes a
batch of greedy requests plain, then with every `1 / fraction`-th request given presence and frequency
penalties (`penalties`), a JSON-schema output (`grammar`) or both (`both`, what `serve_load.py
--constrained-fraction` sends). Each kind runs once to warm up (graph captures, kernel compiles, the grammar's
compile), then the kinds take turns `--repeat` times; the median output tok/s of each and its loss against
plain are printed, and written as JSON with --out. `--profile DIR` then runs each kind once more (32 tokens) under
torch.profiler: DIR gets its trace (chrome://tracing, Perfetto) and a table of the ops by host and device time.

    python benchmarks/constrained_decode.py [--num-prompts 32 --max-tokens 128 --fraction 0.1 --repeat 3]

Needs xgrammar for `grammar` and `both`."""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import time
from pathlib import Path

KINDS = ("plain", "penalties", "grammar", "both")
PROFILED_TOKENS = 32
# the server load's mix: its JSON schema, its penalties and which requests get them
LOAD = runpy.run_path(str(Path(__file__).with_name("serve_load.py")))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="a catalog name or a checkpoint folder")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--num-prompts", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (EOS ignored)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the requests that are changed")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each kind, taking turns")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace and table per kind here")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    if unknown := [k for k in args.kinds if k not in KINDS]:
        p.error(f"--kinds: unknown {', '.join(unknown)} (known: {', '.join(KINDS)})")
    if not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    return args


def sampling_params(kind: str, i: int, args):
    """Request i's SamplingParams, changed as serve_load.py changes its constrained requests (an exact share)."""
    from nanovllm import SamplingParams
    from nanovllm.structured import StructuredOutput

    changed = kind != "plain" and LOAD["is_constrained"](i, args.fraction)
    constrained, extra = LOAD["CONSTRAINED"], {}
    if changed and kind in ("penalties", "both"):
        extra.update({k: v for k, v in constrained.items() if k.endswith("_penalty")})
    if changed and kind in ("grammar", "both"):
        extra.update(structured=StructuredOutput(json=constrained["structured_outputs"]["json"]))
    return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, **extra)


def run(llm, kind: str, args) -> float:
    """Output tok/s of one batch of `kind`."""
    import torch

    prompts = [f"{i}: summarise the quick brown fox and the lazy dog in a record" for i in range(args.num_prompts)]
    params = [sampling_params(kind, i, args) for i in range(args.num_prompts)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return sum(len(o["token_ids"]) for o in outputs) / (time.perf_counter() - start)


def profile(llm, kind: str, args) -> None:
    """One run of `kind`, at most PROFILED_TOKENS new tokens (a trace of every step would be large), under
    torch.profiler: args.profile / f"{kind}.json" (the trace) and f"{kind}.txt" (the ops by self host time, then
    by device time)."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    args.profile.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities) as prof:
        run(llm, kind, argparse.Namespace(**{**vars(args), "max_tokens": min(args.max_tokens, PROFILED_TOKENS)}))
    prof.export_chrome_trace(str(args.profile / f"{kind}.json"))
    ops = prof.key_averages()
    tables = [ops.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=80)]
    if torch.cuda.is_available():
        tables.append(ops.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=80))
    (args.profile / f"{kind}.txt").write_text("\n\n".join(tables))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from nanovllm import LLM

    llm = LLM(args.model, **({"device": args.device} if args.device else {}))
    try:
        for kind in args.kinds:
            run(llm, kind, args)
        timed = {kind: [] for kind in args.kinds}
        for _ in range(args.repeat):
            for kind in args.kinds:
                timed[kind].append(run(llm, kind, args))
        if args.profile:
            for kind in args.kinds:
                profile(llm, kind, args)
    finally:
        llm.close()
    median = {kind: statistics.median(v) for kind, v in timed.items()}
    plain = median.get("plain")
    for kind, tok_s in median.items():
        against = f"  {tok_s / plain - 1:+.1%} against plain" if plain else ""
        print(f"{kind:10s} {tok_s:10.1f} tok/s{against}  (runs: {', '.join(f'{v:.1f}' for v in timed[kind])})")
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "tok_s": median, "runs": timed}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
