"""Batch-1 decode micro-benchmark: each backend's attention_decode over 28 layers back-to-back in one CUDA
graph, at several context lengths (nanovllm.bench.timing's method), plus the small per-layer ops (RMSNorm, add+RMSNorm,
RoPE, SiLU*up). Qwen3-0.6B shapes, bf16, block size 16, each layer its own KV cache. Prints µs per layer.

    python benchmarks/fi_micro.py [--contexts 128,1024,4096] [--backends eager,sdpa,flashinfer,flashinfer_tc]
                                   [--replays 50] [--out fi_micro.json]
"""

from __future__ import annotations

import argparse
import json
import traceback

import numpy as np
import torch

from nanovllm.ops import AttentionMetadata, PlanContext, get_op, load_plugins
from nanovllm.ops.meta import build_metadata
from nanovllm.utils.cuda_graph import capture

LAYERS, HQ, HK, D, BS, HIDDEN, INTER = 28, 16, 8, 128, 16, 1024, 3072
DTYPE = torch.bfloat16


def decode_step(context: int, device) -> AttentionMetadata:
    """One request decoding its token number `context`, on shuffled blocks, as the model runner builds it
    for a CUDA-graph step of batch 1."""
    table = np.random.default_rng(0).permutation(-(-context // BS))
    return build_metadata([table], [context], BS).to_device(device, graph_batch=1)


def graph_time_us(fn, replays: int) -> float:
    """Capture fn() (LAYERS launches of one op) in a CUDA graph; µs per launch over `replays` replays."""
    graph, _ = capture(fn)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * LAYERS)


def attention_us(backend: str, context: int, replays: int) -> float:
    device = torch.device("cuda")
    meta = decode_step(context, device)
    blocks = meta.host["num_blocks"][0]
    kv = torch.randn(2, LAYERS, blocks + 1, BS, HK, D, device=device, dtype=DTYPE)
    q = torch.randn(1, HQ, D, device=device, dtype=DTYPE)
    impl = get_op("attention_decode").impls[backend]
    if impl.plan is not None:
        # max_model_len sizes the graph wrapper's page buffer, kept across contexts: make it roomy
        impl.plan(meta, PlanContext(HQ, HK, D, BS, DTYPE, device, max_num_seqs=1, max_model_len=1 << 16))
    scale = D ** -0.5

    def layers():
        for i in range(LAYERS):
            impl.fn(q, kv[0, i], kv[1, i], meta, scale, 0, 0.0)

    return graph_time_us(layers, replays)


def small_ops(replays: int) -> dict[str, dict[str, float]]:
    """µs per launch of the per-layer elementwise ops at batch 1, native vs flashinfer."""
    device = "cuda"
    x, r = torch.randn(1, HIDDEN, device=device, dtype=DTYPE), torch.randn(1, HIDDEN, device=device, dtype=DTYPE)
    w = torch.ones(HIDDEN, device=device, dtype=DTYPE)
    qkv = torch.randn(1, (HQ + 2 * HK) * D, device=device, dtype=DTYPE)
    q, k = qkv[:, :HQ * D].view(1, HQ, D), qkv[:, HQ * D:(HQ + HK) * D].view(1, HK, D)
    pos = torch.tensor([100], device=device)
    cos_sin = torch.randn(4096, D, device=device)
    gu = torch.randn(1, 2 * INTER, device=device, dtype=DTYPE)
    calls = {"rms_norm": lambda f: f(x, w, 1e-6), "add_rms_norm": lambda f: f(x, r, w, 1e-6),
             "rms_norm (q heads)": lambda f: f(q, w[:D], 1e-6), "rope": lambda f: f(q, k, pos, cos_sin),
             "silu_and_mul": lambda f: f(gu)}
    out = {}
    for name, call in calls.items():
        op = get_op(name.split(" ")[0])
        out[name] = {}
        for backend in ("eager", "flashinfer"):
            fn = op.impls[backend].fn
            out[name][backend] = graph_time_us(lambda fn=fn, call=call: [call(fn) for _ in range(LAYERS)], replays)
    # What a site owning its temporaries could get: FlashInfer's in-place fused add + RMSNorm (one launch).
    from flashinfer.norm import fused_add_rmsnorm

    xs, rs = x.clone(), r.clone()
    out["fused_add_rmsnorm (in place)"] = {"eager": None, "flashinfer": graph_time_us(
        lambda: [fused_add_rmsnorm(xs, rs, w, 1e-6) for _ in range(LAYERS)], replays)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="128,1024,4096")
    p.add_argument("--backends", default="eager,sdpa,flashinfer,flashinfer_tc")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--no-ops", action="store_true", help="skip the small-op table")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    load_plugins()
    contexts = [int(c) for c in a.contexts.split(",")]
    backends = a.backends.split(",")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "attention_us_per_layer": {}}
    try:
        import flashinfer

        result["flashinfer"] = flashinfer.__version__
    except ImportError:
        result["flashinfer"] = None
    print(f"attention_decode, batch 1, {LAYERS} layers in one CUDA graph, µs/layer ({result['device']})")
    print(f"{'backend':<16}" + "".join(f"{'ctx ' + str(c):>12}" for c in contexts), flush=True)
    for backend in backends:
        row = {}
        for c in contexts:
            try:
                row[c] = round(attention_us(backend, c, a.replays), 2)
            except Exception:
                traceback.print_exc()
                row[c] = None
        result["attention_us_per_layer"][backend] = row
        print(f"{backend:<16}" + "".join(f"{'-' if v is None else v:>12}" for v in row.values()), flush=True)
    if not a.no_ops:
        try:
            ops = result["ops_us_per_launch"] = small_ops(a.replays)
            print(f"\nsmall ops, batch 1, {LAYERS} launches in one CUDA graph, µs/launch")
            print(f"{'op':<30}{'eager':>10}{'flashinfer':>12}")
            for name, row in ops.items():
                print(f"{name:<30}" + "".join(f"{'-' if v is None else f'{v:.2f}':>{w}}"
                                              for v, w in ((row["eager"], 10), (row["flashinfer"], 12))))
        except Exception:
            traceback.print_exc()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
