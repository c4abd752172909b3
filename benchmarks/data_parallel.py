"""Output tok/s of the same load against one replica and against `server.data_parallel=N` replicas.

    python benchmarks/data_parallel.py --replicas 2 -c 64 -n 512 --max-tokens 128 --out dp.json \\
        --baseline benchmarks/baseline/<gpu>.json -- model.name=/models/Qwen3-0.6B
    python benchmarks/data_parallel.py --replicas 2 -c 8 -n 32 --max-tokens 16 -- model=tiny device=cpu engine=cpu_small

Starts `python -m nanovllm.serve <overrides> server.data_parallel=1`, runs benchmarks/serve_load.py's load
(closed-loop streaming clients), stops it, then does the same with `server.data_parallel=N`, and prints
`dp_speedup` (output tok/s with N replicas over one). `--out` writes both runs; `--baseline` adds the
`data_parallel` row (`data_parallel`, `dp_speedup`, `gpu`, the two tok/s and the load) to a baseline JSON.
Any other serve_load.py option (-c, -n, --max-tokens, --prompt-words, ...) applies to both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (benchmarks/ is not a package)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True,
                                epilog="Other options go to serve_load.py; Hydra overrides after `--`.")
    p.add_argument("--replicas", type=int, default=2, help="N of server.data_parallel=N")
    p.add_argument("--out", type=Path, default=None, help="write both runs and dp_speedup here")
    p.add_argument("--baseline", type=Path, default=None, help="add the data_parallel row to this baseline JSON")
    args, rest = p.parse_known_args(argv)
    if args.replicas < 2:
        p.error("--replicas must be >= 2")
    load = serve_load.parse_args(["--spawn", *rest])
    return args, load


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def measure(load, replicas: int) -> dict:
    overrides = [o for o in load.overrides if not o.startswith("server.data_parallel=")]
    with serve_load.spawned_server([*overrides, f"server.data_parallel={replicas}"], load.startup_timeout) as url:
        res = asyncio.run(serve_load.run_load(url, load))
    print(f"\n== data_parallel={replicas}")
    serve_load.print_table(res, load)
    if res["failed"]:
        raise SystemExit(f"data_parallel={replicas}: {res['failed']} requests failed: {res['errors']}")
    return res


def main(argv=None) -> int:
    args, load = parse_args(argv)
    one, many = measure(load, 1), measure(load, args.replicas)
    speedup = many["output_tok_s"] / one["output_tok_s"]
    row = dict(data_parallel=args.replicas, dp_speedup=round(speedup, 3), gpu=gpu_name(),
               output_tok_s_1=round(one["output_tok_s"], 1), output_tok_s_n=round(many["output_tok_s"], 1),
               concurrency=load.concurrency, requests=load.requests, max_tokens=load.max_tokens,
               prompt_words=load.prompt_words, overrides=load.overrides, date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    print(f"\ndp_speedup {speedup:.3f} ({row['output_tok_s_n']:,.1f} / {row['output_tok_s_1']:,.1f} output tok/s, "
          f"{args.replicas} replicas vs 1, {row['gpu']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**row, "runs": {"1": one, str(args.replicas): many}}, indent=2))
    if args.baseline:
        baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else {"gpu": row["gpu"]}
        baseline["data_parallel"] = row
        args.baseline.write_text(json.dumps(baseline, indent=2) + "\n")
        print(f"baseline: {args.baseline} (data_parallel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
