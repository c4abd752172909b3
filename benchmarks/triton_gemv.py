"""Decode GEMV bandwidth per projection of Qwen3-0.6B (bf16): cuBLAS vs the Triton GEMV, plus the fused
Triton sites against their unfused (eager) compositions and the Triton decode attention.

Method (as nanovllm.bench.timing): 50 launches back-to-back in one CUDA graph, launch i reading weight copy i %
copies, with enough copies to overflow L2, so a launch streams its weights from HBM; TB/s = weight bytes / time per
launch. The first Triton call of each shape tunes it (or reads ~/.cache/nanovllm/triton/<gpu>.json).

    python benchmarks/triton_gemv.py [--rows 1,8] [--no-fused] [--no-attention] [--out triton_gemv.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F

from nanovllm.ops import AttentionMetadata, get_op, load_plugins, native_site
from nanovllm.ops.meta import build_metadata

H, HQ, HK, D, INTER, VOCAB, EPS = 1024, 16, 8, 128, 3072, 151936, 1e-6
# name: (N, K, target TB/s from the issue)
PROJ = {"qkv": ((HQ + 2 * HK) * D, H, 2.5), "o_proj": (H, HQ * D, 2.0), "gate_up": (2 * INTER, H, 2.5),
        "down": (H, INTER, 2.0), "lm_head": (VOCAB, H, 2.5)}


def randn(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda").mul_(scale).bfloat16()


def param(*shape, scale=0.02):
    """Weights as the model holds them: Parameters (the Triton GEMVs prefetch those across PDL waits)."""
    return torch.nn.Parameter(randn(*shape, scale=scale), requires_grad=False)


def timed(tuning, fn, weights: list[torch.Tensor]) -> float:
    """Seconds per call of fn(*weight copies) in the graph; all of a call's weights rotate together."""
    copies = tuning.num_copies(sum(w.nbytes for w in weights), weights[0].device)
    sets = [weights] + [[torch.nn.Parameter(w.detach().clone(), requires_grad=False) for w in weights]
                        for _ in range(copies - 1)]
    fn(*weights)  # tune / compile outside the capture
    return tuning.graph_time(lambda i: fn(*sets[i]), len(sets))


def row(name, rows, nbytes, base_s, triton_s, nopdl_s=None, target=None, config=None, err=None):
    tbs = lambda t: None if t is None else round(nbytes / t / 1e12, 3)  # noqa: E731
    us = lambda t: None if t is None else round(t * 1e6, 2)  # noqa: E731
    r = dict(name=name, rows=rows, mb=round(nbytes / 1e6, 2), base_us=us(base_s), base_tbs=tbs(base_s),
             triton_us=us(triton_s), triton_tbs=tbs(triton_s), triton_nopdl_tbs=tbs(nopdl_s), target_tbs=target,
             config=config, max_abs_err=err)
    ok = "" if target is None else ("  ok" if r["triton_tbs"] >= target else "  BELOW TARGET")
    print(f"{name:<22}{rows:>5}{r['mb']:>9}{r['base_us']:>10}{r['base_tbs']:>8}{r['triton_us']:>10}"
          f"{r['triton_tbs']:>8}{r['triton_nopdl_tbs'] or '':>8}  {config or ''}{ok}", flush=True)
    return r


@contextlib.contextmanager
def no_pdl():
    os.environ["NANOVLLM_TRITON_PDL"] = "0"
    try:
        yield
    finally:
        del os.environ["NANOVLLM_TRITON_PDL"]


def projections(tuning, rows_list):
    out = []
    for rows in rows_list:
        for name, (n, k, target) in PROJ.items():
            x, w = randn(rows, k), param(n, k)
            gemv = lambda w, x=x: torch.ops.nanovllm_triton.gemv(x, w, None, None, None, 0.0)  # noqa: E731
            err = (gemv(w).float() - F.linear(x, w).float()).abs().max().item()
            base = timed(tuning, lambda w, x=x: F.linear(x, w), [w])
            tri = timed(tuning, gemv, [w])
            with no_pdl():
                nopdl = timed(tuning, gemv, [w])
            cfg = tuning.cached(x.device, f"gemv:bfloat16:N{n}:K{k}:M{tuning.m_bucket(rows)}") or {}
            cfg = {f: cfg[f] for f in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps") if f in cfg}
            out.append(row(name, rows, w.nbytes, base, tri, nopdl, target, cfg or "untuned", err))
    return out


def fused_sites(tuning):
    """Each fused site at batch 1 against its eager composition (cuBLAS linears + PyTorch elementwise), every
    Triton backend of it, its weights in the layout that backend reads."""
    x, r, o = randn(1, H), randn(1, H), randn(1, HQ * D)
    nw = randn(H, scale=0.1).add_(1)
    sites = {
        "norm_qkv": (dict(qkv_w=param(PROJ["qkv"][0], H)), lambda op, w: op(x, nw, w, None, EPS)),
        "attn_out": (dict(o_w=param(H, HQ * D)), lambda op, w: op(o, w, r, nw, EPS)),
        "mlp": (dict(gate_up_w=param(2 * INTER, H), down_w=param(H, INTER)), lambda op, gu, dw: op(x, gu, dw, r)),
        "lm_head_sample": (dict(lm_w=param(VOCAB, H)),
                           lambda op, w: op(x, nw, EPS, w, None, None, None, None, None)),
    }
    out = []
    for name, (weights, call) in sites.items():
        base = timed(tuning, functools.partial(call, native_site(name)), list(weights.values()))
        for backend, impl in get_op(name).impls.items():
            if backend.startswith("triton"):
                laid = [torch.nn.Parameter(impl.layouts[a](w), requires_grad=False) if a in impl.layouts else w
                        for a, w in weights.items()]
                t = timed(tuning, functools.partial(call, impl.fn), laid)
                out.append(row(f"{name} ({backend})", 1, sum(w.nbytes for w in laid), base, t))
    return out


def one_request(ctx: int, page: int) -> tuple[int, AttentionMetadata]:
    """(cache blocks, decode metadata) of one request whose newest token is at position ctx - 1, blocks in order."""
    blocks = -(-ctx // page)
    return blocks, build_metadata([range(blocks)], [ctx], page).to_device("cuda")


def attention_time(tuning, fn, q, caches, meta) -> float:
    fn(q, *caches[0], meta, D ** -0.5, 0, 0.0)
    return tuning.graph_time(lambda i: fn(q, *caches[i], meta, D ** -0.5, 0, 0.0), len(caches), launches=56)


def attention(tuning, contexts=(128, 1024, 4096), page=16):
    """Batch-1 decode attention, one layer's cache per launch (28 caches rotate): Triton vs eager."""
    out = []
    for ctx in contexts:
        blocks, meta = one_request(ctx, page)
        q = randn(1, HQ, D)
        caches = [(randn(blocks, page, HK, D), randn(blocks, page, HK, D)) for _ in range(28)]
        impls = get_op("attention_decode").impls
        base = attention_time(tuning, impls["eager"].fn, q, caches, meta)
        t = attention_time(tuning, impls["triton"].fn, q, caches, meta)
        out.append(row(f"attention ctx={ctx}", 1, 2 * caches[0][0].nbytes, base, t))
    return out


def sites_alone(tuning, sites, x, norms, table, meta, weights, base):
    """The all_fused sites of a layer, each timed by itself."""
    q, k, v = (t.view(1, -1, D) for t in randn(1, PROJ["qkv"][0]).split((HQ * D, HK * D, HK * D), -1))
    o = randn(1, HQ * D)
    parts = {"norm_qkv": (lambda w: sites["norm_qkv"](x, norms[0], w, None, EPS), [weights[0]]),
             "rope_decode_attention": (lambda kc, vc: sites["rope_decode_attention"](
                 q, k, v, norms[1], norms[2], EPS, meta.positions, table, kc, vc, meta, D ** -0.5), weights[4:]),
             "attn_out": (lambda w: sites["attn_out"](o, w, x, norms[3], EPS), [weights[1]]),
             "mlp": (lambda gu, dw: sites["mlp"](x, gu, dw, x), weights[2:4])}
    return [row(f"site {name} alone", 1, sum(w.nbytes for w in ws), base, timed(tuning, fn, ws))
            for name, (fn, ws) in parts.items()]


def decode_layer(tuning, contexts=(128, 4096), page=16):
    """A whole decoder layer at batch 1 (weights and KV rotating, so each launch reads HBM): the all_fused
    sites one after another (7 launches) against the five-launch chain (all_fused's decode_layer, triton_chain)."""
    from nanovllm.layers.rotary import cos_sin_table
    from nanovllm.ops.sites import AttentionSettings, LayerWeights

    class Rope:
        rope_theta = 1e6

    chain = get_op("decode_layer").impls["triton_chain"]
    sites = {op: get_op(op).impls["triton"].fn for op in get_op("decode_layer").parts}
    composed = functools.partial(get_op("decode_layer").native, **sites)
    x, table = randn(1, H), cos_sin_table(Rope(), D, 8192).cuda()
    norms = [randn(n, scale=0.1).add_(1) for n in (H, D, D, H)]
    settings = AttentionSettings(EPS, D ** -0.5)
    out = []
    for ctx in contexts:
        blocks, meta = one_request(ctx, page)
        weights = [param(PROJ["qkv"][0], H), param(H, HQ * D), param(2 * INTER, H), param(H, INTER),
                   randn(blocks, page, HK, D), randn(blocks, page, HK, D)]
        weights[2] = torch.nn.Parameter(chain.layouts["gate_up_w"](weights[2]), requires_grad=False)
        nbytes = sum(w.nbytes for w in weights[:4]) + 2 * ctx * HK * D * 2

        def site_call(fn, qkv_w, o_w, gu, dw, kc, vc, meta=meta):
            w = LayerWeights(norms[0], qkv_w, None, norms[1], norms[2], o_w, norms[3], gu, dw)
            return fn(x, w, settings, meta.positions, table, kc, vc, meta)

        base = timed(tuning, functools.partial(site_call, composed), weights)
        out.append(row(f"layer ctx={ctx} sites", 1, nbytes, base, base))
        out.append(row(f"layer ctx={ctx} chain", 1, nbytes, base,
                       timed(tuning, functools.partial(site_call, chain.fn), weights)))
        if ctx == contexts[0]:  # each site alone
            out += sites_alone(tuning, sites, x, norms, table, meta, weights, base)
    return out


def kernel_resources() -> list[dict]:
    """Registers and spills of every compiled Triton kernel variant of this run (ptxas' choices)."""
    out = []
    for name, mod in sorted(sys.modules.items()):
        if not name.startswith("nanovllm_plugins.triton"):
            continue
        for attr, fn in vars(mod).items():
            for cache in getattr(fn, "device_caches", {}).values():
                for k in cache[0].values():
                    with contextlib.suppress(Exception):  # a kernel never launched has no handles yet
                        k._init_handles()
                        out.append(dict(kernel=attr, regs=k.n_regs, spills=k.n_spills, warps=k.metadata.num_warps))
    for r in {(r["kernel"], r["regs"], r["spills"], r["warps"]): r for r in out}.values():
        print(f"{r['kernel']:<32} {r['warps']:>2} warps {r['regs']:>4} registers {r['spills']:>6} spills")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1", help="comma-separated batch sizes (rows of x), each <= 16")
    p.add_argument("--no-fused", action="store_true")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--skip-gemv", action="store_true", help="only the attention and whole-layer rows")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    logging.basicConfig(format="%(message)s")
    logging.getLogger("nanovllm.triton").setLevel(logging.INFO)  # one line per tuned shape
    load_plugins()
    tuning = sys.modules["nanovllm_plugins.triton._gemv_core"].tuning
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}\n{'':<22}{'rows':>5}{'MB':>9}{'base us':>10}{'TB/s':>8}"
          f"{'triton us':>10}{'TB/s':>8}{'no PDL':>8}  (base: cuBLAS / eager composition)")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, method="50 launches in one CUDA graph, rotating copies")
    with torch.inference_mode():
        if not args.skip_gemv:
            result["projections"] = projections(tuning, [int(r) for r in args.rows.split(",")])
            if not args.no_fused:
                result["fused"] = fused_sites(tuning)
        if not args.no_attention:
            result["attention"] = attention(tuning)
        result["decode_layer"] = decode_layer(tuning)
        result["kernels"] = kernel_resources()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"done in {result['seconds']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
