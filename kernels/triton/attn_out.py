"""Backend `triton` of site `attn_out` (O projection + residual add + post-attention RMSNorm) for decode.

The norm needs the whole output row, which no single GEMV program has, so it takes two kernels: the general
GEMV writes fp32 partial sums (SPLIT_K of them when tuned so); a second kernel, one program per row, sums
them, adds the residual, writes the new residual and the normed row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.workspace import workspace

core = load_sibling(__file__, "_gemv_core")
gdc_launch_dependents, gdc_wait = core.gdc_launch_dependents, core.gdc_wait
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


def add_rms_norm_partials(ws: torch.Tensor, o: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The second kernel: (rms_norm(s), s) with s = the sum of the GEMV's fp32 partials ws (SPLIT_K, M, N) plus
    the residual, in o's dtype, one program per row."""
    split_k, m, n = ws.shape
    block = triton.next_power_of_2(n)
    out, res = o.new_empty(m, n), o.new_empty(m, n)
    pdl = core.pdl(o, residual)
    wrap_triton(_add_rms_norm_kernel)[(m,)](
        ws, residual, norm_w, out, res, m, n, residual.stride(0), out.stride(0), res.stride(0), eps,
        SPLIT_K=split_k, BLOCK=block, PDL=pdl, num_warps=max(1, min(16, block // 256)), **core.launch_opts(pdl))
    return out, res


@triton_op("nanovllm_triton::gemv_add_rms_norm", mutates_args=())
def gemv_add_rms_norm(o: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(o @ w.T + residual), o @ w.T + residual) for at most MAX_M rows."""
    o = o if o.stride(-1) == 1 else o.contiguous()
    (m, k), n = o.shape, w.shape[0]

    def run(cfg, weight):
        ws = workspace("gemv_split_k", (cfg.SPLIT_K, m, n), torch.float32, o)
        core.launch_gemv(o, weight, ws, cfg, partial=True)
        return add_rms_norm_partials(ws, o, residual, norm_w, eps)

    return run(core.tuning.choose("attn_out", n, k, m, o, w, core.bencher(w, run)), w)


def attn_out(o, o_w, residual, norm_w, eps: float, *, parts):
    """O projection into fp32 partials, then residual add + RMSNorm per row (two kernels)."""
    return torch.ops.nanovllm_triton.gemv_add_rms_norm(o, o_w, residual, norm_w, eps)


def check_attn_out(shapes: dict) -> str | None:
    """hidden <= 32768"""
    hidden = shapes.get("hidden", 0)
    return f"hidden size {hidden} > {MAX_HIDDEN}" if hidden > MAX_HIDDEN else None


core.register_site("attn_out", attn_out, check=check_attn_out)
