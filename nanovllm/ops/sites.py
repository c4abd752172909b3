"""Fusion sites: ops whose native function composes primitives passed in as resolved for the layer."""

from __future__ import annotations

from typing import NamedTuple

import torch

from nanovllm.ops.registry import define_op


class LayerWeights(NamedTuple):
    """A pre-norm decoder layer's weights (SiLU MLP), as the decode_layer site reads them. A model builds one
    per layer at construction from the layer's Parameters themselves, so loading and weight layouts (which
    replace a Parameter's .data) show through. Backends' `layouts` name these fields (e.g. "gate_up_w")."""

    input_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm_w: torch.Tensor | None  # per-head q/k RMSNorm weights, None when the model has none
    k_norm_w: torch.Tensor | None
    o_w: torch.Tensor
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor


class AttentionSettings(NamedTuple):
    """A layer's fixed numbers: the RMSNorm epsilon, the attention's score scale, its sliding window (0: full
    attention) and its logit soft-cap (0: none)."""

    eps: float
    scale: float
    window: int = 0
    softcap: float = 0.0


@define_op("norm_qkv", parts=("rms_norm", "linear"))
def norm_qkv(x, norm_w, qkv_w, qkv_b, eps: float, *, rms_norm, linear) -> torch.Tensor:
    """RMSNorm of the residual stream, then the packed QKV projection."""
    return linear(rms_norm(x, norm_w, eps), qkv_w, qkv_b)


@define_op("qk_norm_rope", parts=("rms_norm", "rope", "store_kv"))
def qk_norm_rope(q, k, v, q_norm_w, k_norm_w, eps: float, positions, cos_sin, k_cache, v_cache, slot_mapping,
                 kv_scales=None, *, rms_norm, rope, store_kv) -> torch.Tensor:
    """Per-head q/k RMSNorm (when the model has it), RoPE, and the K/V write into the paged cache (an fp8
    cache with its per-head kv_scales: see nanovllm/ops/kv_quant.py)."""
    if q_norm_w is not None:
        q, k = rms_norm(q, q_norm_w, eps), rms_norm(k, k_norm_w, eps)
    q, k = rope(q, k, positions, cos_sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping, *_kv(kv_scales))
    return q


def _kv(kv_scales) -> tuple:
    """The trailing kv_scales argument of a cache op: passed only for an fp8 cache, so backends that handle
    only the model-dtype cache keep their signatures."""
    return () if kv_scales is None else (kv_scales,)


@define_op("rope_decode_attention", parts=("qk_norm_rope", "attention_decode"))
def rope_decode_attention(q, k, v, q_norm_w, k_norm_w, eps: float, positions, cos_sin, k_cache, v_cache, meta,
                          scale: float, window: int = 0, softcap: float = 0.0, kv_scales=None, *, qk_norm_rope,
                          attention_decode):
    """A decode step's attention from the raw q, k, v projections: q/k norm + RoPE + KV write, then attention."""
    q = qk_norm_rope(q, k, v, q_norm_w, k_norm_w, eps, positions, cos_sin, k_cache, v_cache, meta.slot_mapping,
                     *_kv(kv_scales))
    return attention_decode(q, k_cache, v_cache, meta, scale, window, softcap, *_kv(kv_scales))


@define_op("attn_out", parts=("linear", "add_rms_norm"))
def attn_out(o, o_w, residual, norm_w, eps: float, *, linear, add_rms_norm):
    """O projection, residual add and the post-attention RMSNorm: returns (normed, new residual)."""
    return add_rms_norm(linear(o, o_w), residual, norm_w, eps)


@define_op("mlp", parts=("linear", "silu_and_mul"))
def mlp(h, gate_up_w, down_w, residual, *, linear, silu_and_mul) -> torch.Tensor:
    """Packed gate/up projection, SiLU * up, down projection, plus the residual when given."""
    out = linear(silu_and_mul(linear(h, gate_up_w)), down_w)
    return out if residual is None else residual + out


@define_op("decode_layer", parts=("norm_qkv", "rope_decode_attention", "attn_out", "mlp"))
def decode_layer(x, weights: LayerWeights, settings: AttentionSettings, positions, cos_sin, k_cache, v_cache, meta,
                 kv_scales=None, *, norm_qkv, rope_decode_attention, attn_out, mlp) -> torch.Tensor:
    """A pre-norm decoder layer's decode step (SiLU MLP) on the residual stream x: its four sites in a row."""
    w, s = weights, settings
    kv_heads, head_dim = k_cache.shape[-2:]
    kv = kv_heads * head_dim
    q, k, v = norm_qkv(x, w.input_norm, w.qkv_w, w.qkv_b, s.eps).split((w.qkv_w.shape[0] - 2 * kv, kv, kv), dim=-1)
    o = rope_decode_attention(q.unflatten(-1, (-1, head_dim)), k.unflatten(-1, (kv_heads, head_dim)),
                              v.unflatten(-1, (kv_heads, head_dim)), w.q_norm_w, w.k_norm_w, s.eps, positions,
                              cos_sin, k_cache, v_cache, meta, s.scale, s.window, s.softcap, *_kv(kv_scales))
    h, x = attn_out(o.flatten(1), w.o_w, x, w.post_norm, s.eps)
    return mlp(h, w.gate_up_w, w.down_w, x)


@define_op("lm_head_sample", parts=("rms_norm", "linear", "sample"))
def lm_head_sample(h, norm_w, eps: float, lm_w, temperature, top_k, top_p, min_p, noise,
                   *, rms_norm, linear, sample) -> torch.Tensor:
    """Final RMSNorm, LM head and sampling, for steps that need no logits back."""
    return sample(linear(rms_norm(h, norm_w, eps), lm_w), temperature, top_k, top_p, min_p, noise)
