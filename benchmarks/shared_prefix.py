"""Shared-prefix batch decode: `flashinfer` vs `flashinfer_cascade` attention_decode.

64 requests share a 2,048-token system prompt (the same KV blocks, as the prefix cache hands them out) and
each has its own 16-128-token question; then every request decodes --steps tokens. A step is what the
engine does for attention: build the step's metadata, run the plan hook, run attention_decode in each of
the 28 layers (Qwen3-0.6B shapes, bf16). Attention only: the rest of the model is the same for both, so
tok/s here is an upper bound set by attention. `flashinfer_graph` replays the 28 layers from a CUDA graph
(cascade cannot: its kernels change with the prefix), to separate launch overhead from KV traffic.

    python benchmarks/shared_prefix.py [--requests 64] [--prefix 2048] [--steps 32] [--out shared_prefix.json]

`--host-tier` runs the other shared-prefix workload instead: prefixes that exceed the GPU KV pool, time to first
token of a revisit recomputed against loaded from the KV host tier (benchmarks/shared_prefix_host_tier.py):

    python benchmarks/shared_prefix.py --host-tier [--models default,qwen3-8b-random] [--prefixes 8] ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from nanovllm.ops import AttentionMetadata, PlanContext, get_op, load_plugins
from nanovllm.ops.meta import build_metadata
from nanovllm.utils.cuda_graph import capture

LAYERS, HQ, HK, D, BS = 28, 16, 8, 128, 16
DTYPE = torch.bfloat16


class Workload:
    """Block tables of the batch: the shared prefix blocks first, then each request's own blocks."""

    def __init__(self, requests: int, prefix: int, steps: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.prefix_blocks = prefix // BS
        self.lens = prefix + rng.integers(16, 129, requests)  # after the question's prefill
        own = -(-(self.lens + steps) // BS) - self.prefix_blocks
        self.num_blocks = self.prefix_blocks + int(own.sum())
        ids = rng.permutation(self.num_blocks)
        shared, rest = ids[:self.prefix_blocks], ids[self.prefix_blocks:]
        self.tables = np.zeros((requests, self.prefix_blocks + own.max()), dtype=np.int64)
        start = 0
        for i, n in enumerate(own):
            self.tables[i, :self.prefix_blocks + n] = np.concatenate([shared, rest[start:start + n]])
            start += n

    def meta(self, step: int, device, graph: bool = False) -> AttentionMetadata:
        seq_lens = self.lens + step  # this step's new token is number seq_len
        step_meta = build_metadata(list(self.tables), seq_lens, BS)  # rows as allocated: blocks for every step
        return step_meta.to_device(device, graph_batch=len(seq_lens) if graph else None)


def run(backend: str, work: Workload, steps: int, kv, q, ctx, graph: bool = False):
    """Decode `steps` steps; returns (seconds per step, plan seconds per step, first step's layer-0 output)."""
    impl = get_op("attention_decode").impls[backend]
    scale, device = D ** -0.5, q.device

    def layers(meta):  # layer 0's output is kept to compare backends
        return [impl.fn(q, kv[0, i], kv[1, i], meta, scale, 0, 0.0) for i in range(LAYERS)][0]

    if graph:
        meta = work.meta(0, device, graph=True)
        impl.plan(meta, ctx)
        cuda_graph, static_out = capture(lambda: layers(meta))
    plan_s, first = 0.0, None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(steps):
        meta = work.meta(step, device, graph=graph)
        p0 = time.perf_counter()
        impl.plan(meta, ctx)  # outside the graph, every step
        plan_s += time.perf_counter() - p0
        if graph:
            cuda_graph.replay()
            out = static_out
        else:
            out = layers(meta)
        if step == 0:
            first = out.clone()
        torch.cuda.synchronize()  # the engine syncs every step (it reads the sampled tokens back)
    return (time.perf_counter() - t0) / steps, plan_s / steps, first


def main() -> None:
    if "--host-tier" in sys.argv[1:]:
        from shared_prefix_host_tier import main as host_tier_main  # a sibling script: benchmarks/ is on sys.path

        host_tier_main([arg for arg in sys.argv[1:] if arg != "--host-tier"])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    load_plugins()
    device = torch.device("cuda")
    work = Workload(a.requests, a.prefix, a.steps)
    kv = torch.randn(2, LAYERS, work.num_blocks + 1, BS, HK, D, device=device, dtype=DTYPE)
    q = torch.randn(a.requests, HQ, D, device=device, dtype=DTYPE)
    ctx = PlanContext(HQ, HK, D, BS, DTYPE, device, max_num_seqs=a.requests,
                      max_model_len=int(work.lens.max()) + a.steps + BS)
    rows, ref = [], None
    for name, backend, graph in (("flashinfer", "flashinfer", False), ("flashinfer_graph", "flashinfer", True),
                                 ("flashinfer_cascade", "flashinfer_cascade", False)):
        run(backend, work, 2, kv, q, ctx, graph)  # warm-up (and JIT on first use)
        step_s, plan_s, first = run(backend, work, a.steps, kv, q, ctx, graph)
        ref = first if ref is None else ref
        rows.append(dict(backend=name, step_ms=step_s * 1e3, plan_ms=plan_s * 1e3,
                         tok_s=a.requests / step_s, max_abs_diff=float((first.float() - ref.float()).abs().max())))
    shared = get_op("attention_decode").impls["flashinfer_cascade"].plan.last_shared_blocks
    print(f"{a.requests} requests, {a.prefix}-token shared prefix ({shared} shared blocks used by cascade), "
          f"{a.steps} decode steps, attention only ({LAYERS} layers), {torch.cuda.get_device_name()}")
    print(f"{'backend':<20}{'step ms':>10}{'plan ms':>10}{'tok/s':>10}{'max|diff|':>12}")
    for r in rows:
        print(f"{r['backend']:<20}{r['step_ms']:>10.3f}{r['plan_ms']:>10.3f}{r['tok_s']:>10.0f}{r['max_abs_diff']:>12.4f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(requests=a.requests, prefix=a.prefix, steps=a.steps, shared_blocks=shared,
                           device=torch.cuda.get_device_name(), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
