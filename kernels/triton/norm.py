"""Backend `triton` of `rms_norm` and `add_rms_norm`: one program per row, one launch per call.

The fused decode sites take at most 16 rows; larger steps (prefill, decode of many requests) fall back to
the composition of their parts, where the native RMSNorm is six PyTorch kernels (cast, pow, mean, rsqrt,
mul, cast) and the residual add a seventh. These kernels do it in one pass over the row, rounding where the
native rounds: s = round(x + residual), then round(weight * round(s / rms(s))).
Rows are (outer, inner) index pairs, so a (tokens, heads, head_dim) view of the packed QKV output (q/k
norms) is read in place, without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import get_op, register_impl
from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")
gdc_launch_dependents, gdc_wait = core.gdc_launch_dependents, core.gdc_wait
MAX_WIDTH = 65536  # one program holds a whole row


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, N, sx0, sx1, sr0, sr1, inner, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (outer * inner,): row (i, j) of x (and residual) at i * s0 + j * s1; out and sum contiguous."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    i, j = row // inner, row % inner
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + i * sx0 + j * sx1 + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RES:
        r = tl.load(r_ptr + i * sr0 + j * sr1 + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = w * (xf * rstd).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * N + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as (outer, inner, N) with a unit last stride, a view where the strides allow."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        return x
    return x.reshape(1, -1, x.shape[-1]) if x.dim() <= 2 else x.reshape(-1, x.shape[-2], x.shape[-1])


def launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    x3 = rows_view(x)
    r3 = rows_view(residual) if residual is not None else x3
    block = triton.next_power_of_2(n)
    pdl = core.pdl(x, weight)
    if x.numel():
        wrap_triton(_rms_norm_kernel)[(x3.shape[0] * x3.shape[1],)](
            x3, r3, weight, out, s if s is not None else out, n, x3.stride(0), x3.stride(1), r3.stride(0),
            r3.stride(1), x3.shape[1], eps, HAS_RES=residual is not None, BLOCK=block, PDL=pdl,
            num_warps=max(1, min(16, block // 256)), **core.launch_opts(pdl))
    return out, s


@triton_op("nanovllm_triton::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return launch(x, None, weight, eps)[0]


@triton_op("nanovllm_triton::add_rms_norm", mutates_args=())
def add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return launch(x, residual, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in one kernel."""
    return torch.ops.nanovllm_triton.rms_norm(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual) in one kernel; broadcasting shapes take the native."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        return get_op("add_rms_norm").native(x, residual, weight, eps)
    return torch.ops.nanovllm_triton.add_rms_norm(x, residual, weight, float(eps))


def _check(shapes: dict) -> str | None:
    """hidden <= 65536"""
    hidden = shapes.get("hidden", 0)
    return f"hidden size {hidden} > {MAX_WIDTH}" if hidden > MAX_WIDTH else None


register_impl("rms_norm", "triton", devices=core.devices(), dtypes=core.DTYPES, check=_check)(rms_norm)
register_impl("add_rms_norm", "triton", devices=core.devices(), dtypes=core.DTYPES, check=_check)(add_rms_norm)
