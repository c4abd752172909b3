"""Backend `triton` of site `mlp`: two kernels for decode.

1. gate/up GEMV with the SiLU * up epilogue: each program streams the gate rows j and the up rows I + j
   of the packed (2I, H) weight against the same x loads, and writes only the (M, I) activation.
2. down GEMV with the residual add in its store (the general GEMV of _gemv_core, split-K when tuned so).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")
gemv_tile, gdc_launch_dependents = core.gemv_tile, core.gdc_launch_dependents


@triton.jit
def _gate_up_silu_kernel(x_ptr, w_ptr, a_ptr, M, INTER, K, stride_xm, stride_wn, stride_am, EVEN_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                         PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """Grid (INTER blocks, 1, M blocks): a = silu(x @ gate.T) * (x @ up.T), rounded as the native rounds."""
    if PDL:
        gdc_launch_dependents()
    pid_n, pid_m = tl.program_id(0), tl.program_id(2)
    gate, up = gemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, x_ptr, M, INTER, K, 0, K, 0.0, pid_m, pid_n,
                         INTER * stride_wn, False, True, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PDL, PREFETCH)
    dtype = a_ptr.dtype.element_ty
    gate, up = gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32)  # the gate_up linear's output
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up  # F.silu rounds, then the product
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < INTER)
    tl.store(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :], act.to(dtype), mask=mask)


@triton_op("nanovllm_triton::gate_up_silu", mutates_args=())
def gate_up_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(x @ w.T) for the packed [gate; up] weight w (2I, K) and at most MAX_M rows of x."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    (m, k), inter = x.shape, w.shape[0] // 2

    def run(cfg, weight):
        core.check_config(cfg, m)
        out = x.new_empty(m, inter)
        bm, pdl = core.tuning.block_m(m), core.pdl(x, weight)
        wrap_triton(_gate_up_silu_kernel)[(triton.cdiv(inter, cfg.BLOCK_N), 1, triton.cdiv(m, bm))](
            x, weight, out, m, inter, k, x.stride(0), weight.stride(0), out.stride(0),
            EVEN_K=k % cfg.BLOCK_K == 0, BLOCK_M=bm, DOT_F32=core.dot_f32(x), PDL=pdl,
            PREFETCH=core.prefetch(pdl, weight), **cfg.meta(), **core.launch_opts(pdl))
        return out

    cfg = core.tuning.choose("gate_up_silu", inter, k, m, x, w, core.bencher(w, run), split=False, tile=2)
    return run(cfg, w)


def mlp(h, gate_up_w, down_w, residual, *, parts):
    """gate/up + SiLU * up in one kernel, down (+ residual) in a second."""
    act = torch.ops.nanovllm_triton.gate_up_silu(h, gate_up_w)
    return torch.ops.nanovllm_triton.gemv(act, down_w, None, residual, None, 0.0)


core.register_site("mlp", mlp)
