"""Backend `triton_quant` of `linear`: the weight-streaming GEMV over a QuantizedWeight's packed values for
decode (at most 16 rows); up to GEMM_MAX_ROWS rows the same kernel as a GEMM that dequantizes its tiles in
registers; more rows dequantize the weight and run a dense matmul (cuBLAS on the GPU).

Formats fp8, int8 and int4, with or without offsets, any power-of-two group size or one group per row,
act-order permutations (see _quant_core.py). Launch configs are tuned per format, shape and rows, as the
dense GEMV's.
"""

from __future__ import annotations

import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling
from nanovllm.quant.weights import FORMATS

qcore = load_sibling(__file__, "_quant_core")


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for a QuantizedWeight W: the quantized GEMV up to MAX_M rows, GEMM up to GEMM_MAX_ROWS,
    W.linear beyond."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or rows > qcore.GEMM_MAX_ROWS or qcore.supported(weight) is not None:
        return weight.linear(x, bias)
    y = torch.ops.nanovllm_triton.qgemv(x.reshape(rows, x.shape[-1]), *qcore.weight_args(weight), bias, None, None,
                                        0.0)
    return y.view(*x.shape[:-1], weight.shape[0])


register_impl("linear", "triton_quant", devices=qcore.core.devices(), dtypes=qcore.DTYPES, formats=FORMATS)(linear)
