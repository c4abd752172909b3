"""Shared prefixes that exceed the GPU KV pool: time to first token of a revisited prefix, recomputed (no host tier)
against loaded back from the KV host tier (`kv_offload_gb`). Run as `benchmarks/shared_prefix.py --host-tier`.

K distinct prefixes of P tokens; the device KV pool (num_kvcache_blocks) holds D < K of them. Requests cycle
through the prefixes, each with a question of its own and one new token, so under the LRU free list every revisit
misses the device cache. The first cycle fills the caches; the revisits of the next rounds are timed (median).

    python benchmarks/shared_prefix.py --host-tier [--models default,qwen3-8b-random] [--prefixes 8]
        [--prefix-len 8192] [--device-prefixes 4] [--rounds 2] [--out shared_prefix_host_tier.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time

import torch

from nanovllm import LLM, SamplingParams

ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def workload(a) -> tuple[list[list[int]], list[list[int]]]:
    """(prefixes, the questions of every visit in order: rounds + 1 cycles over the prefixes)."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 150000) for _ in range(a.prefix_len)] for _ in range(a.prefixes)]
    questions = [[rng.randrange(1000, 150000) for _ in range(a.question_len)]
                 for _ in range((a.rounds + 1) * a.prefixes)]
    return prefixes, questions


def measure(model: str, kv_offload_gb: float, a) -> dict:
    """TTFT (ms) of each revisit, one request at a time, and the engine's host-tier hit tokens."""
    prefixes, questions = workload(a)
    bs = a.block_size
    request_len = a.prefix_len + a.question_len + 1
    blocks_per_request = -(-request_len // bs)
    llm = LLM(model, device=a.device, kvcache_block_size=bs, num_kvcache_blocks=a.device_prefixes * blocks_per_request,
              max_model_len=request_len + bs, max_num_batched_tokens=request_len + bs, max_num_seqs=4,
              kv_offload_gb=kv_offload_gb)
    try:
        ttft = []
        for i, question in enumerate(questions):
            ids = prefixes[i % a.prefixes] + question
            if a.device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate([ids], ONE_TOKEN)
            if i >= a.prefixes:  # a revisit
                ttft.append((time.perf_counter() - t0) * 1e3)
        bm = llm.engine.block_manager
        tier = llm.engine.kv_tier
        return dict(ttft_ms=statistics.median(ttft), host_hit_tokens=bm.num_prefix_host_hit_tokens,
                    device_hit_tokens=bm.num_prefix_device_hit_tokens,
                    bandwidth_gbs=tier.costs.bandwidth / 1e9 if tier is not None else None,
                    kv_bytes_per_token=llm.engine.runner.kv_bytes_per_token)
    finally:
        llm.close()
        gc.collect()  # the host tier's pinned memory and the model's cycles, before the next engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def host_gib(kv_bytes_per_token: int, a) -> float:
    """Room for every prefix (and its questions' blocks) in the host tier, with a margin."""
    return 1.25 * a.prefixes * (a.prefix_len + a.question_len + a.block_size) * kv_bytes_per_token / 2**30


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default,qwen3-8b-random", help="comma-separated catalog names or paths")
    p.add_argument("--prefixes", type=int, default=8, help="K distinct prefixes")
    p.add_argument("--prefix-len", type=int, default=8192)
    p.add_argument("--question-len", type=int, default=32, help="tokens of each request after its prefix")
    p.add_argument("--device-prefixes", type=int, default=4, help="requests the device KV pool holds (< K)")
    p.add_argument("--rounds", type=int, default=2, help="timed cycles over the prefixes after the first")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="shared_prefix_host_tier.json")
    a = p.parse_args(argv)
    if not 0 < a.device_prefixes < a.prefixes:
        raise SystemExit(f"--device-prefixes must be in [1, --prefixes) so revisits miss the device, "
                         f"got {a.device_prefixes} of {a.prefixes}")
    gpu = torch.cuda.get_device_name() if a.device != "cpu" else "cpu"
    rows = []
    for model in a.models.split(","):
        recompute = measure(model, 0.0, a)
        host = measure(model, host_gib(recompute["kv_bytes_per_token"], a), a)
        expected = a.rounds * a.prefixes * a.prefix_len
        if host["host_hit_tokens"] < expected:
            print(f"warning: {model}: {host['host_hit_tokens']} host-tier hit tokens, {expected} expected")
        if recompute["device_hit_tokens"]:
            print(f"warning: {model}: revisits found {recompute['device_hit_tokens']} tokens on the device")
        rows.append(dict(model=model, workload=f"shared_prefix K={a.prefixes} P={a.prefix_len} D={a.device_prefixes}",
                         ttft_recompute_ms=round(recompute["ttft_ms"], 2), ttft_host_hit_ms=round(host["ttft_ms"], 2),
                         speedup=round(recompute["ttft_ms"] / host["ttft_ms"], 2), gpu=gpu,
                         host_hit_tokens=host["host_hit_tokens"], host_to_device_gbs=round(host["bandwidth_gbs"], 1),
                         kv_gib_per_prefix=round(a.prefix_len * recompute["kv_bytes_per_token"] / 2**30, 3)))
    print(f"{a.prefixes} prefixes of {a.prefix_len} tokens, device pool holds {a.device_prefixes}, "
          f"{a.rounds} timed rounds, median TTFT of revisits, {gpu}")
    print(f"{'model':<24}{'recompute ms':>14}{'host hit ms':>13}{'speedup':>9}{'H2D GB/s':>10}{'KV GiB/prefix':>15}")
    for r in rows:
        print(f"{r['model']:<24}{r['ttft_recompute_ms']:>14.2f}{r['ttft_host_hit_ms']:>13.2f}{r['speedup']:>9.2f}"
              f"{r['host_to_device_gbs']:>10.1f}{r['kv_gib_per_prefix']:>15.3f}")
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
