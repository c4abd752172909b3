"""attention_prefill and attention_decode on torch's scaled_dot_product_attention, backend `sdpa`.

Each request's pages are gathered into a padded (B, Hk, max_blocks * block_size, D) K/V in the cache's
dtype (the native converts them to float32 and repeats them per query head first), and one batched SDPA
call does the rest: no loop over requests, no host sync, so it captures in a CUDA graph.

GQA without repeating K/V: the query heads that share a KV head are folded into the query axis, as
(B, Hk, group * Lq, D), which every SDPA kernel accepts (enable_gqa is not supported by all of them).
Masking (causal with the chunk's offset into its request, the request's length, a sliding window) is one
boolean mask built from positions. SDPA has no logit soft-cap: with softcap > 0 the native runs instead.
An fp8 cache (kv_scales given) is dequantized to the query's dtype as its pages are gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.ops import AttentionMetadata, kv_quant, register_impl
from nanovllm.ops.primitives import paged_attention


def _gather(cache: torch.Tensor, meta: AttentionMetadata, scale: torch.Tensor | None, dtype) -> torch.Tensor:
    """(B, Hk, L, D) in `dtype`: each request's blocks in order (an fp8 cache times its per-head `scale`);
    slots past its length are masked out."""
    pages = cache[meta.block_tables].flatten(1, 2)
    return (pages if scale is None else kv_quant.dequantize(pages, scale, dtype)).transpose(1, 2)


def _gather_kv(k_cache, v_cache, meta: AttentionMetadata, kv_scales, dtype):
    k_scale, v_scale = (None, None) if kv_scales is None else kv_scales
    return _gather(k_cache, meta, k_scale, dtype), _gather(v_cache, meta, v_scale, dtype)


def _visible(q_pos: torch.Tensor, num_keys: int, window: int) -> torch.Tensor:
    """q_pos (..., Lq) -> (..., Lq, L) bool: key positions <= the query's (and within the window)."""
    k_pos = torch.arange(num_keys, device=q_pos.device)
    q_pos = q_pos.unsqueeze(-1)
    visible = k_pos <= q_pos
    if window > 0:
        visible = visible & (k_pos > q_pos - window)
    return visible


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """q (B, Hq, Lq, D), k/v (B, Hk, L, D), mask (B, Lq, L) -> (B, Hq, Lq, D)."""
    b, hq, lq, d = q.shape
    hk = k.shape[1]
    group = hq // hk
    q = q.reshape(b, hk, group * lq, d)  # query head h = kv head h // group, as repeat_interleave has it
    if lq == 1:
        mask = mask.unsqueeze(1)  # (B, 1, 1, L): broadcasts over the folded heads
    else:
        mask = mask.unsqueeze(1).expand(b, group, lq, mask.shape[-1]).reshape(b, 1, group * lq, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, lq, d)


@register_impl("attention_decode", "sdpa", kv_dtypes=kv_quant.KV_CACHE_DTYPES)
def decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int = 0,
           softcap: float = 0.0, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    if softcap > 0:
        return paged_attention(q, k_cache, v_cache, meta, scale, window, softcap, kv_scales)
    k, v = _gather_kv(k_cache, v_cache, meta, kv_scales, q.dtype)
    mask = _visible(meta.positions, k.shape[2], window).unsqueeze(1)  # (B, 1, L): one query per request
    return _grouped_sdpa(q.unsqueeze(2), k, v, mask, scale).squeeze(2)


@register_impl("attention_prefill", "sdpa", kv_dtypes=kv_quant.KV_CACHE_DTYPES)
def prefill(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int = 0,
            softcap: float = 0.0, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    if softcap > 0:
        return paged_attention(q, k_cache, v_cache, meta, scale, window, softcap, kv_scales)
    num_seqs, max_q = meta.num_seqs, meta.max_seqlen_q
    n_heads, head_dim = q.shape[1], q.shape[2]
    k, v = _gather_kv(k_cache, v_cache, meta, kv_scales, q.dtype)
    # Scatter the packed queries into a padded (B, max_q) layout; padded rows see key 0 and are dropped.
    qp = q.new_zeros(num_seqs * max_q, n_heads, head_dim).index_copy_(0, meta.pad_index, q)
    qp = qp.view(num_seqs, max_q, n_heads, head_dim).transpose(1, 2)
    q_pos = meta.positions.new_zeros(num_seqs * max_q).index_copy_(0, meta.pad_index, meta.positions)
    mask = _visible(q_pos.view(num_seqs, max_q), k.shape[2], window)
    out = _grouped_sdpa(qp, k, v, mask, scale)
    return out.transpose(1, 2).reshape(num_seqs * max_q, n_heads, head_dim)[meta.pad_index]
