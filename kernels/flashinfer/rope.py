"""rope on FlashInfer's cos/sin-cache rotary kernel, backend `flashinfer`.

Our table is (max_positions, head_dim) float32 rows [cos | sin] (NeoX layout, rotate halves), which is
the layout of FlashInfer's cos_sin_cache with is_neox=True (interleave=False). One launch rotates q and k.
"""

from __future__ import annotations

import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

common = load_sibling(__file__, "_common")


@torch.library.custom_op("nanovllm_fi::rope", mutates_args=())
def _rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
          cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flashinfer.rope import apply_rope_with_cos_sin_cache

    # Strided q/k views of the packed QKV are fine (the kernel takes row and head strides); the outputs are
    # fresh and contiguous, as the fake below says.
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    q_out, k_out = apply_rope_with_cos_sin_cache(positions, q, k, q.shape[-1], cos_sin.float(), is_neox=True)
    return q_out.contiguous(), k_out.contiguous()


@_rope.register_fake
def _(q, k, positions, cos_sin):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def _check(shapes: dict) -> str | None:
    """head_dim in {64, 128, 256}"""
    return None if shapes.get("head_dim", 128) in (64, 128, 256) else f"head_dim {shapes['head_dim']} unsupported"


@register_impl("rope", "flashinfer", check=_check, **common.SUPPORT)
def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    return torch.ops.nanovllm_fi.rope(q, k, positions, cos_sin)
