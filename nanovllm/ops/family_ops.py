"""Ops the model families beyond Qwen3 need: Gemma's GELU-tanh MLP and sandwich norms, and top-k MoE.

Native references, like ops/primitives.py and ops/sites.py: plain PyTorch, the semantics every backend
must match. Sites compose primitives passed in as resolved for the layer, so kernels registered for
`linear`, `rms_norm` ... apply inside them too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.ops import primitives, sites  # noqa: F401  (the parts these ops compose are defined first)
from nanovllm.ops.registry import define_op


@define_op("gelu_tanh_and_mul")
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GELU(gate, tanh approximation) * up for x = [gate | up] along the last dim (Gemma)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


@define_op("gelu_mlp", parts=("linear", "gelu_tanh_and_mul"))
def gelu_mlp(h, gate_up_w, down_w, residual, *, linear, gelu_tanh_and_mul) -> torch.Tensor:
    """The `mlp` site with GELU-tanh: packed gate/up, GELU(gate) * up, down, plus the residual when given."""
    out = linear(gelu_tanh_and_mul(linear(h, gate_up_w)), down_w)
    return out if residual is None else residual + out


@define_op("post_norm_attn_out", parts=("linear", "rms_norm", "add_rms_norm"))
def post_norm_attn_out(o, o_w, residual, post_w, pre_mlp_w, eps: float, *, linear, rms_norm, add_rms_norm):
    """Sandwich-norm attention output (Gemma): O projection, RMSNorm, residual add, then the pre-MLP
    RMSNorm. Returns (normed, new residual) like `attn_out`."""
    return add_rms_norm(rms_norm(linear(o, o_w), post_w, eps), residual, pre_mlp_w, eps)


@define_op("post_norm_residual", parts=("rms_norm",))
def post_norm_residual(x, weight, residual, eps: float, *, rms_norm) -> torch.Tensor:
    """residual + RMSNorm(x): the post-MLP half of a sandwich norm."""
    return residual + rms_norm(x, weight, eps)


@define_op("topk_route")
def topk_route(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Router: softmax over experts in float32, the top_k of them, optionally renormalized to sum 1.
    Returns (weights in the logits' dtype, expert ids), each (N, top_k)."""
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


@define_op("moe")
def moe(x: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor, topk_weights: torch.Tensor,
        topk_ids: torch.Tensor) -> torch.Tensor:
    """Sum over each token's experts of weight * down(SiLU(gate) * up). x (N, H), gate_up_w (E, 2I, H),
    down_w (E, H, I), topk_* (N, k).

    Few tokens (decode) gather only their experts' weights; many tokens (prefill) run every expert over
    all tokens with a zero weight where unrouted: no data-dependent shapes either way, so the op stays
    capturable in CUDA graphs and fullgraph compile (fused kernels skip the unrouted work).
    """
    n, k = topk_ids.shape
    num_experts = gate_up_w.shape[0]
    if n * k <= num_experts:
        gu = torch.einsum("nh,nkoh->nko", x, gate_up_w[topk_ids])
        gate, up = gu.chunk(2, dim=-1)
        y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, down_w[topk_ids])
        return (y * topk_weights[..., None]).sum(dim=1)
    dense = torch.zeros(n, num_experts, dtype=topk_weights.dtype, device=x.device)
    dense.scatter_add_(1, topk_ids, topk_weights)  # a repeated expert counts twice, as in the gathered path
    out = torch.zeros_like(x)
    for e in range(num_experts):
        gate, up = F.linear(x, gate_up_w[e]).chunk(2, dim=-1)
        out = out + F.linear(F.silu(gate) * up, down_w[e]) * dense[:, e, None]
    return out


@define_op("moe_mlp", parts=("linear", "topk_route", "moe"))
def moe_mlp(h, router_w, gate_up_w, down_w, residual, top_k: int, renormalize: bool,
            *, linear, topk_route, moe) -> torch.Tensor:
    """Sparse MoE block: router projection, top-k routing, the experts, plus the residual when given."""
    weights, ids = topk_route(linear(h, router_w), top_k, renormalize)
    out = moe(h, gate_up_w, down_w, weights, ids)
    return out if residual is None else residual + out
