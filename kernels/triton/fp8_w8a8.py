"""Backend `fp8_w8a8` of `linear`: FP8 weights times FP8 activations for the compute-bound steps (prefill,
large batches), the activations quantized per token on the fly.

Each row of x gets its own scale, amax(|row|) / 448 (the e4m3 maximum), and is rounded to e4m3; then one
`torch._scaled_mm` (FP8 tensor cores) multiplies it by the per-output-channel FP8 weight with both scale
vectors applied in its epilogue: y[m, n] = (sum_k xq[m, k] wq[n, k]) * sx[m] * sw[n]. Decode steps (at most
16 rows) are weight-bandwidth bound and run the weight-only quantized GEMV (`triton_quant`) instead; weights
with group-wise scales (block-wise FP8), act-order, or sizes the FP8 GEMM does not take run `triton_quant`'s
weight-only GEMM (up to its row limit) or the dequantize-then-matmul reference.
"""

from __future__ import annotations

import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

qcore = load_sibling(__file__, "_quant_core")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq, sx): x (M, K) as float8_e4m3fn with one float32 scale per row (M, 1), x ~= xq * sx."""
    xf = x.float()
    sx = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    xq = (xf / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, sx


def scaled_mm_reason(x: torch.Tensor, weight) -> str | None:
    """Why the FP8 GEMM cannot take this step, or None."""
    if weight.format != "fp8":
        return f"{weight.format} weights"
    if weight.group_size != weight.in_features:
        return "group-wise weight scales (the GEMM applies one scale per output channel)"
    if weight.perm is not None:
        return "act-order permutation"
    if x.dtype != torch.bfloat16:
        return f"activations in {x.dtype} (the row-wise scaled GEMM writes bf16)"
    if weight.in_features % 16 or weight.out_features % 16:
        return "in/out features not multiples of 16"
    return None


def w8a8_linear(x2d: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x2d (M, K) bf16 @ W.T through quantize_rows and one row-wise scaled FP8 GEMM."""
    xq, sx = quantize_rows(x2d)
    sw = weight.scale.float().reshape(1, -1)
    y = torch._scaled_mm(xq, weight.qweight.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
    return y if bias is None else y + bias


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for an FP8 QuantizedWeight: W8A8 FP8 GEMM beyond MAX_M rows, the quantized GEMV up to."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < rows <= qcore.tuning.MAX_M and qcore.supported(weight) is None:
        y = torch.ops.nanovllm_triton.qgemv(x.reshape(rows, x.shape[-1]), *qcore.weight_args(weight), bias, None,
                                            None, 0.0)
        return y.view(*x.shape[:-1], weight.shape[0])
    if rows == 0 or scaled_mm_reason(x, weight) is not None:  # the weight-only path of `triton_quant`
        if 0 < rows <= qcore.GEMM_MAX_ROWS and qcore.supported(weight) is None:
            y = torch.ops.nanovllm_triton.qgemv(x.reshape(rows, x.shape[-1]), *qcore.weight_args(weight), bias,
                                                None, None, 0.0)
            return y.view(*x.shape[:-1], weight.shape[0])
        return weight.linear(x, bias)
    y = w8a8_linear(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def needs() -> str | None:
    """An FP8 GPU (compute capability 8.9+) and torch._scaled_mm."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return "FP8 tensor cores need compute capability 8.9+"
    return None if hasattr(torch, "_scaled_mm") else "torch._scaled_mm is missing"


register_impl("linear", "fp8_w8a8", devices=("cuda",), dtypes=(torch.bfloat16,), needs=needs,
              formats=("fp8",))(linear)
