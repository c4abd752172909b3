"""Fused MoE experts in Triton: backend `triton` of the `moe` op.

Two launches per MoE block, whatever the number of experts: (1) for every (token, expert) pair, the
gate and up rows of that expert's weight times the token, with SiLU(gate) * up fused on the way out;
(2) the down projection of each pair, scaled by its routing weight. Only routed experts are read, so a
batch-1 decode step reads top_k experts' weights. Each program handles one pair and a block of output
columns (a GEMV), which is right for decode; prefill re-reads an expert's weights for each of its tokens
(a grouped GEMM over expert-sorted tokens would be the next step). Wrapped with torch.library.triton_op
so CUDA graphs and torch.compile see one op. On a CPU it runs under TRITON_INTERPRET=1 (tests only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

import nanovllm.ops.family_ops  # noqa: F401  (defines the moe op before this registers against it)
from nanovllm.ops import register_impl


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, H, INTER, top_k, stride_we, stride_wn,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    token = pair // top_k
    w = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token * H + k, mask=k < H, other=0.0).to(tl.float32)
        mask = (n[:, None] < INTER) & (k[None, :] < H)
        gate = tl.load(w + n[:, None] * stride_wn + k[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(w + (n[:, None] + INTER) * stride_wn + k[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_gate += tl.sum(gate * x[None, :], axis=1)
        acc_up += tl.sum(up * x[None, :], axis=1)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    tl.store(out_ptr + pair * INTER + n, act.to(out_ptr.dtype.element_ty), mask=n < INTER)


@triton.jit
def _down_kernel(a_ptr, w_ptr, ids_ptr, weights_ptr, out_ptr, H, INTER, stride_we, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    w = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + pair * INTER + k, mask=k < INTER, other=0.0).to(tl.float32)
        wd = tl.load(w + n[:, None] * stride_wn + k[None, :], mask=(n[:, None] < H) & (k[None, :] < INTER), other=0.0)
        acc += tl.sum(wd.to(tl.float32) * a[None, :], axis=1)
    scale = tl.load(weights_ptr + pair).to(tl.float32)
    tl.store(out_ptr + pair * H + n, (acc * scale).to(out_ptr.dtype.element_ty), mask=n < H)


@triton_op("nanovllm::fused_moe", mutates_args=())
def fused_moe(x: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    n, hidden = x.shape
    top_k, inter = topk_ids.shape[1], down_w.shape[2]
    pairs = n * top_k
    x, ids, weights = x.contiguous(), topk_ids.reshape(-1).contiguous(), topk_weights.reshape(-1).contiguous()
    gate_up_w, down_w = gate_up_w.contiguous(), down_w.contiguous()
    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    block_n, block_k = 32, 64
    wrap_triton(_gate_up_kernel)[(pairs, triton.cdiv(inter, block_n))](
        x, gate_up_w, ids, act, hidden, inter, top_k, gate_up_w.stride(0), gate_up_w.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k)
    wrap_triton(_down_kernel)[(pairs, triton.cdiv(hidden, block_n))](
        act, down_w, ids, weights, out, hidden, inter, down_w.stride(0), down_w.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k)
    return out.view(n, top_k, hidden).sum(dim=1)


def _needs() -> str | None:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "needs a CUDA GPU (or TRITON_INTERPRET=1 for the CPU interpreter)"


register_impl("moe", "triton", dtypes=(torch.float32, torch.float16, torch.bfloat16), needs=_needs)(fused_moe)
