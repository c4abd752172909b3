"""Load test of the OpenAI-compatible server: N concurrent streaming clients, throughput and latency.

Against a running server:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 32 --requests 256 --out load.json
Starting the server itself (Hydra overrides after `--`), waiting for /health, and stopping it after:
    python benchmarks/serve_load.py --spawn --concurrency 8 --requests 32 --out load.json -- model=tiny device=cpu

Each client has its own HTTP connection and sends its requests one after another (a closed loop), streamed
with `stream_options.include_usage`. Reported: output tok/s over the whole run, TTFT (request sent to first
token chunk) and inter-token latency (gap between token chunks; a chunk carries one token unless text was
held back for a split character or a possible stop string), p50/p99 each.

`--constrained-fraction 0.1` makes every tenth request a constrained one: a JSON-schema structured output
(vLLM's `structured_outputs.json`) with presence and frequency penalties, so the cost of grammar masks and
logit adjustments under load can be compared with a plain run of the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while seven engineers measure tokens per second on "
         "paged caches and careful kernels").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Hydra overrides for --spawn go after `--`.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (ignored with --spawn)")
    p.add_argument("--spawn", action="store_true", help="start `python -m nanovllm.serve` with the overrides")
    p.add_argument("--concurrency", "-c", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--requests", "-n", type=int, default=64, help="measured requests in total")
    p.add_argument("--warmup-requests", type=int, default=None, help="unmeasured requests first (default: -c)")
    p.add_argument("--prompt-words", type=int, default=64, help="words per prompt (about a token each)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="stop at EOS (default: always max-tokens)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions (default /v1/completions)")
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY"))
    p.add_argument("--model", default=None, help="model id (default: the server's first /v1/models entry)")
    p.add_argument("--time-limit", type=float, default=600.0, help="stop sending requests after this many s")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="--spawn: seconds to wait for /health")
    p.add_argument("--seed", type=int, default=0, help="prompt text seed")
    p.add_argument("--constrained-fraction", type=float, default=0.0,
                   help="fraction of requests with a JSON-schema output and presence/frequency penalties")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for --spawn (after `--`)")
    args = p.parse_args(argv)
    for o in args.overrides:  # --spawn with a key: the clients use it too
        if args.api_key is None and o.startswith("server.api_key="):
            args.api_key = o.split("=", 1)[1]
    if args.concurrency < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--concurrency, --requests and --max-tokens must be >= 1")
    if not 0 <= args.constrained_fraction <= 1:
        p.error("--constrained-fraction must be between 0 and 1")
    if args.spawn and args.constrained_fraction > 0 and importlib.util.find_spec("xgrammar") is None:
        p.error("--constrained-fraction: the server's JSON-schema outputs need xgrammar (pip install xgrammar)")
    return args


# ---- the server (--spawn) ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def spawned_server(overrides: list[str], timeout: float):
    """`python -m nanovllm.serve` on 127.0.0.1 and a free port; yields its URL; stops it on exit."""
    port = free_port()
    run_dir = tempfile.mkdtemp(prefix="serve_load_")
    log_path = Path(run_dir) / "server.log"
    cmd = [sys.executable, "-m", "nanovllm.serve", *overrides, "server.host=127.0.0.1", f"server.port={port}",
           f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"starting: {' '.join(cmd)}\n  log: {log_path}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no /health within {timeout:g} s:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully, the engine frees its memory
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# ---- the clients -------------------------------------------------------------------------------------
def make_prompt(rng: random.Random, i: int, words: int) -> str:
    """A distinct prompt per request (its index first), so the prefix cache does not short-cut prefill."""
    return f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(max(words - 1, 0)))


# a schema whose strings can run to max_tokens, so constrained requests are as long as the others
RECORD_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "notes": {"type": "string"}},
                 "required": ["name", "notes"]}
CONSTRAINED = {"structured_outputs": {"json": RECORD_SCHEMA}, "presence_penalty": 0.5, "frequency_penalty": 0.5}


def is_constrained(i: int, fraction: float) -> bool:
    """Request i is constrained when the running count of fraction * i steps up: evenly spread, exact share."""
    return int((i + 1) * fraction) > int(i * fraction)


async def one_request(client: httpx.AsyncClient, args, model: str, prompt: str, constrained: bool = False) -> dict:
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
            "ignore_eos": not args.no_ignore_eos, "stream_options": {"include_usage": True},
            **(CONSTRAINED if constrained else {})}
    path = "/v1/completions"
    if args.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    t0 = time.perf_counter()
    chunks, tokens, error = [], 0, None
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"].get("message")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for c in event.get("choices", []):
                if c.get("text") or (c.get("delta") or {}).get("content") or c.get("finish_reason"):
                    chunks.append(time.perf_counter())
                    break
    if error or not chunks:
        return {"ok": False, "error": error or "no tokens"}
    gaps = [b - a for a, b in zip(chunks, chunks[1:])]
    return {"ok": True, "ttft": chunks[0] - t0, "gaps": gaps, "tokens": tokens, "latency": chunks[-1] - t0,
            "constrained": constrained}


async def run_load(url: str, args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
        model = args.model or (await c.get("/v1/models")).json()["data"][0]["id"]
    rng = random.Random(args.seed)
    warmup = args.concurrency if args.warmup_requests is None else args.warmup_requests
    prompts = [make_prompt(rng, i, args.prompt_words) for i in range(warmup + args.requests)]
    results: list[dict] = []
    deadline = time.monotonic() + args.time_limit

    async def client_loop(indices, keep: bool):
        # one connection per client: a single httpx pool shared by many tasks adds latency of its own
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600, connect=30)) as c:
            for i in indices:  # shared iterator: each client takes the next request when it is free
                if time.monotonic() > deadline:
                    return
                res = await one_request(c, args, model, prompts[i], is_constrained(i, args.constrained_fraction))
                if keep:
                    results.append(res)

    async def phase(indices: range, clients: int, keep: bool):
        shared = iter(indices)
        await asyncio.gather(*(client_loop(shared, keep) for _ in range(min(clients, len(indices)))))

    await phase(range(warmup), args.concurrency, keep=False)
    t0 = time.perf_counter()
    await phase(range(warmup, len(prompts)), args.concurrency, keep=True)
    return summarize(results, time.perf_counter() - t0, model)


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]
    return {"p50": pick(0.5) * 1e3, "p90": pick(0.9) * 1e3, "p99": pick(0.99) * 1e3,
            "mean": statistics.fmean(xs) * 1e3}


def summarize(results: list[dict], duration: float, model: str) -> dict:
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"model": model, "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
            "constrained": sum(r.get("constrained", False) for r in ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5], "duration_s": duration,
            "output_tokens": tokens, "output_tok_s": tokens / duration if duration > 0 else 0.0,
            "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
            "ttft_ms": percentiles([r["ttft"] for r in ok]),
            "itl_ms": percentiles([g for r in ok for g in r["gaps"]]),
            "tpot_ms": percentiles(tpot)}


def print_table(res: dict, args) -> None:
    fmt = lambda v: "-" if v is None else f"{v:,.1f}"
    rows = [("model", res["model"]), ("clients x requests", f"{args.concurrency} x {res['requests']}"),
            ("ok / failed", f"{res['ok']} / {res['failed']}"), ("constrained", str(res["constrained"])),
            ("duration", f"{res['duration_s']:.2f} s"),
            ("output tokens", f"{res['output_tokens']:,}"), ("throughput", f"{fmt(res['output_tok_s'])} tok/s"),
            ("requests", f"{res['requests_per_s']:.2f} req/s")]
    for name in ("ttft_ms", "itl_ms", "tpot_ms"):
        p = res[name]
        rows.append((name.replace("_ms", "").upper(), f"p50 {fmt(p['p50'])} ms  p99 {fmt(p['p99'])} ms  "
                     f"mean {fmt(p['mean'])} ms"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    for e in res["errors"]:
        print(f"error: {e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.spawn:
        with spawned_server(args.overrides, args.startup_timeout) as url:
            res = asyncio.run(run_load(url, args))
    else:
        res = asyncio.run(run_load(args.url, args))
    res["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}
    res["config"]["overrides"] = [o if not o.startswith("server.api_key=") else "server.api_key=***"
                                  for o in args.overrides]  # no secrets in result files
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print_table(res, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(f"results: {args.out}")
    return 0 if res["ok"] and not res["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
