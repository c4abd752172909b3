"""Backend `triton` of `embedding` (experimental, preset `triton_embedding`): the token rows' gather in a kernel
launched with PDL.

The native gather (`weight[ids]`, an ATen index kernel) is the one kernel of a Triton decode step that PDL
does not overlap: the first layer's GEMV starts only once it has finished, and streams its weights after it.
Here the gather lets its dependents launch at once, so that GEMV prefetches while it runs. Measured within
noise of all_fused (benchmarks/RESULTS.md, "what we tried that lost"), so it is not shipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_builtin

core = load_builtin("triton/_gemv_core")
gdc_launch_dependents, gdc_wait = core.gdc_launch_dependents, core.gdc_wait
MAX_BLOCK = 4096


@triton.jit
def _embedding_kernel(ids_ptr, w_ptr, scale_ptr, out_ptr, hidden, stride_w, stride_wk, HAS_SCALE: tl.constexpr,
                      BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (tokens, column blocks): out[t] = w[ids[t]] (* scale rounded to w's dtype, then rounded)."""
    if PDL:  # the ids may come from the kernel before (a sampler's tokens), and out may be its input
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    row = tl.load(ids_ptr + t).to(tl.int64)
    x = tl.load(w_ptr + row * stride_w + offs * stride_wk, mask=mask)  # stride_wk 1: specialized
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(x.dtype).to(tl.float32)
        x = (x.to(tl.float32) * scale).to(x.dtype)
    tl.store(out_ptr + t * hidden + offs, x, mask=mask)


@triton_op("nanovllm_experiments::embedding", mutates_args=())
def embedding_op(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    flat = ids.reshape(-1)
    hidden = weight.shape[1]
    out = weight.new_empty(flat.shape[0], hidden)
    block = min(MAX_BLOCK, triton.next_power_of_2(hidden))
    pdl = core.pdl(flat, weight)
    if out.numel():
        wrap_triton(_embedding_kernel)[(flat.shape[0], triton.cdiv(hidden, block))](
            flat, weight, scale if scale is not None else weight, out, hidden, weight.stride(0), weight.stride(1),
            HAS_SCALE=scale is not None, BLOCK=block, PDL=pdl, num_warps=4, **core.launch_opts(pdl))
    return out.view(*ids.shape, hidden)


@register_impl("embedding", "triton", devices=core.devices(), dtypes=core.DTYPES)
def embedding(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The rows' gather in one PDL kernel (the first layer's GEMV prefetches its weights meanwhile)."""
    return torch.ops.nanovllm_experiments.embedding(ids, weight, scale)
