"""rms_norm and add_rms_norm on FlashInfer's RMSNorm kernels, backend `flashinfer`.

add_rms_norm is functional (returns (rms_norm(x + residual), x + residual) and leaves its inputs alone),
while flashinfer.fused_add_rmsnorm overwrites both inputs. Using it would take two clones first (three
launches); an add then the RMSNorm kernel is two launches and less traffic, so that is what runs here. A
fusion site that owns its temporaries can call fused_add_rmsnorm in place instead.
"""

from __future__ import annotations

import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

common = load_sibling(__file__, "_common")


def _rmsnorm_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    from flashinfer.norm import rmsnorm

    # The kernel takes (rows, hidden) or (rows, heads, head_dim) with a unit last stride; q/k views of the
    # packed QKV output are strided (fine), other shapes are flattened.
    if x.dim() not in (2, 3) or x.stride(-1) != 1:
        x, out = x.reshape(-1, x.shape[-1]).contiguous(), out.view(-1, x.shape[-1])
    rmsnorm(x, weight.to(x.dtype), eps, out=out)


@torch.library.custom_op("nanovllm_fi::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rmsnorm_into(out, x, weight, eps)
    return out


@_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("nanovllm_fi::add_rms_norm", mutates_args=())
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    out = torch.empty_like(s)
    _rmsnorm_into(out, s, weight, eps)
    return out, s


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    s = x + residual
    return torch.empty_like(s), torch.empty_like(s)


@register_impl("rms_norm", "flashinfer", **common.SUPPORT)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.nanovllm_fi.rms_norm(x, weight, eps)


@register_impl("add_rms_norm", "flashinfer", **common.SUPPORT)
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return torch.ops.nanovllm_fi.add_rms_norm(x, residual, weight, eps)
