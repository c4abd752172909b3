"""Backend `triton` of `silu_and_mul`: SiLU(gate) * up in one launch (the native takes three kernels).

For the steps the fused `mlp` site leaves to the composition of its parts (more than 16 rows). Rounds where
the native rounds: round(round(silu(gate)) * up).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")
gdc_launch_dependents, gdc_wait = core.gdc_launch_dependents, core.gdc_wait
BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows, column blocks): out[row] = silu(x[row, :inter]) * x[row, inter:]."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32) * up
    tl.store(out_ptr + row * inter + offs, act.to(gate.dtype), mask=mask)


@triton_op("nanovllm_triton::silu_and_mul", mutates_args=())
def silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], inter)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pdl = core.pdl(x)
    if out.numel():
        wrap_triton(_silu_and_mul_kernel)[(x2.shape[0], triton.cdiv(inter, BLOCK))](
            x2, out, inter, x2.stride(0), BLOCK=BLOCK, PDL=pdl, num_warps=4, **core.launch_opts(pdl))
    return out


@register_impl("silu_and_mul", "triton", devices=core.devices(), dtypes=core.DTYPES)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for x = [gate | up] in one kernel."""
    return torch.ops.nanovllm_triton.silu_and_mul(x)
