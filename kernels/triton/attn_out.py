"""Backends of site `attn_out` (O projection + residual add + post-attention RMSNorm) for decode.

The norm needs the whole output row, which no single GEMV program has.
- `triton`, two kernels: the general GEMV writes fp32 partial sums (SPLIT_K of them when tuned so); a
  second kernel, one program per row, sums them, adds the residual, writes the new residual and the
  normed row.
- `triton_onepass` (experimental), one kernel: the same GEMV programs, and the last of them to finish
  (an arrival counter) does the second kernel's work for every row, saving a launch per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")
gdc_launch_dependents, gdc_wait = core.gdc_launch_dependents, core.gdc_wait
program_tile, store_partial, arrive_last = core.program_tile, core.store_partial, core.arrive_last
MAX_HIDDEN = 32768  # one program holds a whole row


@triton.jit
def add_rms_norm_row(ws_ptr, r_ptr, nw_ptr, out_ptr, res_ptr, m, M, N, stride_rm, stride_om, stride_sm, eps,
                     SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """Row m: s = round(round(sum of partials) + residual); out = round(norm_w * round(s / rms(s)))."""
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
    dtype = out_ptr.dtype.element_ty
    r = tl.load(r_ptr + m * stride_rm + offs, mask=mask, other=0.0).to(tl.float32)
    s = (acc.to(dtype).to(tl.float32) + r).to(dtype)
    tl.store(res_ptr + m * stride_sm + offs, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / N + eps)
    nw = tl.load(nw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, (nw * (sf * rstd).to(dtype).to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def _add_rms_norm_kernel(ws_ptr, r_ptr, nw_ptr, out_ptr, res_ptr, M, N, stride_rm, stride_om, stride_sm, eps,
                         SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (M,): one row each."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    add_rms_norm_row(ws_ptr, r_ptr, nw_ptr, out_ptr, res_ptr, tl.program_id(0), M, N, stride_rm, stride_om,
                     stride_sm, eps, SPLIT_K, BLOCK)


@triton.jit
def _gemv_add_rms_norm_kernel(x_ptr, w_ptr, ws_ptr, r_ptr, nw_ptr, out_ptr, res_ptr, count_ptr, M, N, K, stride_xm,
                              stride_wn, stride_rm, stride_om, stride_sm, eps, SPLIT_K: tl.constexpr,
                              EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                              PREFETCH: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (N blocks, SPLIT_K, M blocks): partial sums, then the last program to finish does every row."""
    acc, _, offs_m, offs_n, pid_k = program_tile(x_ptr, w_ptr, x_ptr, x_ptr, M, N, K, stride_xm, stride_wn, 0, eps,
                                                 False, False, SPLIT_K, EVEN_K, ONE_TILE, BLOCK_M, BLOCK_N, BLOCK_K,
                                                 DOT_F32, PDL, PREFETCH)
    store_partial(ws_ptr, acc, pid_k, offs_m, offs_n, M, N)
    if arrive_last(count_ptr, tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)):
        for m in range(M):
            add_rms_norm_row(ws_ptr, r_ptr, nw_ptr, out_ptr, res_ptr, m, M, N, stride_rm, stride_om, stride_sm, eps,
                             SPLIT_K, BLOCK)


@triton_op("nanovllm_triton::gemv_add_rms_norm", mutates_args=())
def gemv_add_rms_norm(o: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor,
                      eps: float, onepass: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(o @ w.T + residual), o @ w.T + residual) for at most MAX_M rows; `onepass`: one kernel."""
    o = o if o.stride(-1) == 1 else o.contiguous()
    (m, k), n = o.shape, w.shape[0]
    block = triton.next_power_of_2(n)
    count = core.counters(o.device, 1) if onepass else None

    def run(cfg, weight):
        ws = o.new_empty(cfg.SPLIT_K, m, n, dtype=torch.float32)
        out, res = o.new_empty(m, n), o.new_empty(m, n)
        pdl = core.pdl(o, residual)
        if count is None:
            core.launch_gemv(o, weight, ws, cfg, partial=True)
            wrap_triton(_add_rms_norm_kernel)[(m,)](
                ws, residual, norm_w, out, res, m, n, residual.stride(0), out.stride(0), res.stride(0), eps,
                SPLIT_K=cfg.SPLIT_K, BLOCK=block, PDL=pdl, num_warps=max(1, min(16, block // 256)),
                **core.launch_opts(pdl))
            return out, res
        core.check_config(cfg, m)
        bm = core.tuning.block_m(m)
        wrap_triton(_gemv_add_rms_norm_kernel)[(triton.cdiv(n, cfg.BLOCK_N), cfg.SPLIT_K, triton.cdiv(m, bm))](
            o, weight, ws, residual, norm_w, out, res, count, m, n, k, o.stride(0), weight.stride(0),
            residual.stride(0), out.stride(0), res.stride(0), eps, SPLIT_K=cfg.SPLIT_K,
            EVEN_K=k % (cfg.SPLIT_K * cfg.BLOCK_K) == 0, ONE_TILE=core.one_tile(k, cfg), BLOCK_M=bm,
            DOT_F32=core.dot_f32(o), PDL=pdl, PREFETCH=core.prefetch(pdl, weight), BLOCK=block, **cfg.meta(),
            **core.launch_opts(pdl))
        return out, res

    name = "attn_out_onepass" if count is not None else "attn_out"
    return run(core.tuning.choose(name, n, k, m, o, w, core.bencher(w, run)), w)


def attn_out(o, o_w, residual, norm_w, eps: float, *, parts):
    """O projection into fp32 partials, then residual add + RMSNorm per row (two kernels)."""
    return torch.ops.nanovllm_triton.gemv_add_rms_norm(o, o_w, residual, norm_w, eps)


def attn_out_onepass(o, o_w, residual, norm_w, eps: float, *, parts):
    """O projection, residual add and RMSNorm in one kernel: the last program to finish does the rows."""
    return torch.ops.nanovllm_triton.gemv_add_rms_norm(o, o_w, residual, norm_w, eps, True)


def _check(shapes: dict) -> str | None:
    """hidden <= 32768"""
    hidden = shapes.get("hidden", 0)
    return f"hidden size {hidden} > {MAX_HIDDEN}" if hidden > MAX_HIDDEN else None


core.register_site("attn_out", attn_out, check=_check)
core.register_site("attn_out", attn_out_onepass, check=_check, backend="triton_onepass")
