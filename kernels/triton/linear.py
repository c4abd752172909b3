"""Backend `triton` of `linear`: a weight-streaming GEMV for decode (at most 16 rows), cuBLAS for more rows.

Launch configs are tuned per (N, K, rows) and cached per GPU (see _tuning.py); bias is fused into the store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias: Triton GEMV up to MAX_M rows, F.linear (cuBLAS) beyond."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or rows > core.tuning.MAX_M:
        return F.linear(x, weight, bias)
    y = torch.ops.nanovllm_triton.gemv(x.reshape(rows, x.shape[-1]), weight, bias, None, None, 0.0)
    return y.view(*x.shape[:-1], weight.shape[0])


register_impl("linear", "triton", devices=core.devices(), dtypes=core.DTYPES)(linear)
