"""Backend `triton_quant` of site `mlp`: the dense backend's two decode kernels (mlp.py) over quantized weights.

The packed [gate; up] QuantizedWeight is stored row-interleaved (gate_0, up_0, gate_1, ...: values, scales and
offsets alike, `QuantizedWeight.map_rows`), so the first kernel is the quantized GEMV with the SiLU * up
epilogue, writing only the (M, I) activation; the second is the quantized down GEMV with the residual add in
its store. Steps with more rows than a GEMV takes run the layer's linear on the interleaved weight and
un-interleave its output (as mlp.py).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops.plugins import load_builtin, load_sibling
from nanovllm.quant.weights import is_quantized

qcore = load_sibling(__file__, "_quant_core")
dense = load_builtin("triton/mlp")
core = qcore.core
qgemv_tile, store_silu_mul = qcore.qgemv_tile, core.store_silu_mul


@triton.jit
def _qgate_up_silu_kernel(x_ptr, w_ptr, s_ptr, o_ptr, perm_ptr, a_ptr, nw_ptr, M, N, K, KB, group, stride_xm, stride_wn,
                          stride_sn, stride_am, eps, FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                          HAS_PERM: tl.constexpr, SCALE_LAST: tl.constexpr, SUB: tl.constexpr,
                          HAS_NORM: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                          PREFETCH: tl.constexpr):
    """Grid (N blocks, 1, M blocks), N = 2I interleaved rows: a = silu(x @ gate.T) * (x @ up.T), rounded as
    the native rounds; HAS_NORM: of rms_norm(x) * nw."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(2)
    acc, _ = qgemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, o_ptr, stride_sn, perm_ptr, group, nw_ptr, x_ptr,
                        0, M, N, K, 0, K, KB, eps, pid_m, pid_n, FORMAT, HAS_OFFSET, HAS_PERM, SCALE_LAST, SUB,
                        HAS_NORM, False, ONE_TILE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PDL, PREFETCH)
    store_silu_mul(acc, a_ptr, stride_am, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)


@triton_op("nanovllm_triton::qgate_up_silu", mutates_args=())
def qgate_up_silu(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                  perm: torch.Tensor | None, fmt: str, group: int, norm_w: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
    """silu_and_mul(x @ [gate; up].T) for the row-interleaved quantized weight (2I, K) and at most MAX_M rows
    of x; with norm_w, of rms_norm(x, norm_w, eps) instead of x."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    qw = qcore.qw_of(fmt, qweight, scale, offset, perm, group, k)

    def run(cfg, w):
        cfg = dataclasses.replace(cfg, BLOCK_N=max(2, cfg.BLOCK_N))  # a program holds whole (gate, up) pairs
        qcore.check_qconfig(cfg, m, w)
        out = x.new_empty(m, w.n // 2)
        bm, pdl = core.tuning.block_m(m), core.pdl(x, w.qweight)
        q, kb = qcore.stored(w, m)
        wrap_triton(_qgate_up_silu_kernel)[(triton.cdiv(w.n, cfg.BLOCK_N), 1, triton.cdiv(m, bm))](
            x, q, w.scale, w.offset, w.perm, out, norm_w, m, w.n, k, kb, w.group, x.stride(0), q.stride(0),
            w.scale.stride(0), out.stride(0), eps, HAS_NORM=norm_w is not None, ONE_TILE=core.one_tile(k, cfg),
            BLOCK_M=bm, DOT_F32=core.dot_f32(x), PDL=pdl, PREFETCH=qcore.prefetch(pdl, norm_w),
            **qcore.kernel_args(w, cfg, m), **cfg.meta(), **core.launch_opts(pdl))
        return out

    name = "qgate_up_silu_norm" if norm_w is not None else "qgate_up_silu"
    return run(qcore.choose(name, x, qw, run, split=False), qw)


def gate_up_silu(x, w, norm_w=None, eps: float = 0.0) -> torch.Tensor:
    """The gate/up GEMV + SiLU * up of the interleaved weight w, quantized or dense."""
    if is_quantized(w):
        return torch.ops.nanovllm_triton.qgate_up_silu(x, *qcore.weight_args(w), norm_w, eps)
    return torch.ops.nanovllm_triton.gate_up_silu(x, w, norm_w, eps)


def mlp(h, gate_up_w, down_w, residual, *, parts):
    """gate/up + SiLU * up in one kernel, down (+ residual) in a second."""
    return qcore.gemv(gate_up_silu(h, gate_up_w), down_w, None, residual)


qcore.register_quant_site("mlp", mlp, many_rows=dense.mlp_many_rows, layouts={"gate_up_w": qcore.interleave_gate_up})
