"""silu_and_mul on FlashInfer's fused activation kernel, backend `flashinfer`: one launch instead of three."""

from __future__ import annotations

import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

common = load_sibling(__file__, "_common")


@torch.library.custom_op("nanovllm_fi::silu_and_mul", mutates_args=())
def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    from flashinfer.activation import silu_and_mul

    return silu_and_mul(x.contiguous())


@_silu_and_mul.register_fake
def _(x):
    return torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)


def _check(shapes: dict) -> str | None:
    """intermediate % 8 == 0 (16-byte rows)"""
    inter = shapes.get("intermediate", 0)
    return None if inter % 8 == 0 else f"intermediate size {inter} is not a multiple of 8"


@register_impl("silu_and_mul", "flashinfer", check=_check, **common.SUPPORT)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.nanovllm_fi.silu_and_mul(x)
