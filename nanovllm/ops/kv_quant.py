"""The FP8 KV cache's number format: K and V are stored as float8_e4m3fn = round(x / scale), clamped to the
format's range, and read back as fp8 * scale, with one float32 scale per KV head and layer.

A layer's scales travel as one (2, kv_heads) float32 tensor `kv_scales`: row 0 scales K, row 1 scales V.
Ops that touch the cache take it as their last positional argument; None means a cache in the model dtype.
"""

from __future__ import annotations

import torch

from nanovllm.ops.registry import KV_DTYPES as KV_CACHE_DTYPES

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A calibrated scale maps this multiple of the calibration's largest |x| to FP8_MAX, so keys and values somewhat
# larger than any the calibration text produced still fit; e4m3's relative precision is the same at every
# magnitude down to its subnormals, so the headroom costs almost nothing.
CALIBRATION_HEADROOM = 2.0
ALIASES = {"fp8_e4m3": "fp8", "float8_e4m3fn": "fp8"}


def normalize(kv_cache_dtype: str) -> str:
    """The canonical name of a KV cache dtype ("auto" or "fp8"); a clear error on anything else."""
    name = ALIASES.get(kv_cache_dtype, kv_cache_dtype)
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {[*KV_CACHE_DTYPES, *ALIASES]}")
    return name


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of the cache tensors."""
    return FP8 if normalize(kv_cache_dtype) == "fp8" else model_dtype


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., kv_heads, head_dim) -> fp8 round(x / scale), scale (kv_heads,) float32."""
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, head_axis: int = -2) -> torch.Tensor:
    """fp8 x (kv heads along `head_axis`) -> x * scale in `dtype`, computed in float32; scale None: the cast only."""
    if scale is None:
        return x.to(dtype)
    shape = [1] * x.dim()
    shape[head_axis] = scale.numel()
    return (x.float() * scale.view(shape)).to(dtype)


def scales_from_amax(amax: torch.Tensor, headroom: float = CALIBRATION_HEADROOM) -> torch.Tensor:
    """Per-head scales that map headroom * amax to FP8_MAX (heads that never saw a nonzero value: scale 1)."""
    amax = amax.float()
    return torch.where(amax > 0, amax * headroom / FP8_MAX, torch.ones_like(amax))
