"""Backend `triton` of site `mlp`: two kernels for decode, over gate/up rows stored interleaved.

At load time the packed [gate; up] (2I, H) weight is rewritten row-interleaved (gate_0, up_0, gate_1, ...;
`interleave_gate_up`, the backend's weight layout), so the first kernel is a plain weight-streaming GEMV
whose program holds matching gate and up rows side by side:
1. gate/up GEMV with the SiLU * up epilogue: each program streams BLOCK_N contiguous rows (BLOCK_N / 2
   pairs) and writes only the (M, I) activation.
2. down GEMV with the residual add in its store (the general GEMV of _gemv_core, split-K when tuned so).
Steps with more rows than a GEMV takes (prefill) run cuBLAS on the interleaved weight and un-interleave
its output before the native activation.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")
gemv_tile, store_silu_mul = core.gemv_tile, core.store_silu_mul
interleave_gate_up = core.interleave_gate_up


@triton.jit
def _gate_up_silu_kernel(x_ptr, w_ptr, a_ptr, nw_ptr, M, N, K, stride_xm, stride_wn, stride_am, eps,
                         HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                         PREFETCH: tl.constexpr):
    """Grid (N blocks, 1, M blocks), N = 2I interleaved rows: a = silu(x @ gate.T) * (x @ up.T), rounded as
    the native rounds; HAS_NORM: of rms_norm(x) * nw (the RMSNorm applied on the fly, as in the norm GEMV)."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(2)
    acc, _ = gemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, nw_ptr, x_ptr, 0, M, N, K, 0, K, eps, pid_m, pid_n, HAS_NORM,
                       False, EVEN_K, ONE_TILE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PDL, PREFETCH)
    store_silu_mul(acc, a_ptr, stride_am, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)


@triton_op("nanovllm_triton::gate_up_silu", mutates_args=())
def gate_up_silu(x: torch.Tensor, w: torch.Tensor, norm_w: torch.Tensor | None = None,
                 eps: float = 0.0) -> torch.Tensor:
    """silu_and_mul(x @ [gate; up].T) for the row-interleaved weight w (2I, K) and at most MAX_M rows of x;
    with norm_w, of rms_norm(x, norm_w, eps) instead of x."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    x, norm_w = core.norm_apart(x, norm_w, eps)
    (m, k), n = x.shape, w.shape[0]

    def run(cfg, weight):
        cfg = dataclasses.replace(cfg, BLOCK_N=max(2, cfg.BLOCK_N))  # a program holds whole (gate, up) pairs
        core.check_config(cfg, m)
        out = x.new_empty(m, n // 2)
        bm, pdl = core.tuning.block_m(m), core.pdl(x, weight)
        wrap_triton(_gate_up_silu_kernel)[(triton.cdiv(n, cfg.BLOCK_N), 1, triton.cdiv(m, bm))](
            x, weight, out, norm_w, m, n, k, x.stride(0), weight.stride(0), out.stride(0), eps,
            HAS_NORM=norm_w is not None, EVEN_K=k % cfg.BLOCK_K == 0, ONE_TILE=core.one_tile(k, cfg), BLOCK_M=bm,
            DOT_F32=core.dot_f32(x), PDL=pdl, PREFETCH=core.prefetch(pdl, weight, norm_w), **cfg.meta(),
            **core.launch_opts(pdl))
        return out

    name = "gate_up_silu_norm" if norm_w is not None else "gate_up_silu"
    return run(core.tuning.choose(name, n, k, m, x, w, core.bencher(w, run), split=False), w)


def mlp(h, gate_up_w, down_w, residual, *, parts):
    """gate/up + SiLU * up in one kernel, down (+ residual) in a second."""
    act = torch.ops.nanovllm_triton.gate_up_silu(h, gate_up_w)
    return torch.ops.nanovllm_triton.gemv(act, down_w, None, residual, None, 0.0)


def mlp_many_rows(h, gate_up_w, down_w, residual, *, parts):
    """A prefill step: the layer's linear on the interleaved weight, its output back to [gate | up]."""
    y = parts["linear"](h, gate_up_w)
    y = y.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    out = parts["linear"](parts["silu_and_mul"](y), down_w)
    return out if residual is None else residual + out


core.register_site("mlp", mlp, many_rows=mlp_many_rows, layouts={"gate_up_w": interleave_gate_up})
