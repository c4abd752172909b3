"""Native references of the primitive ops: plain PyTorch, the semantics every backend must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.ops import kv_quant
from nanovllm.ops.meta import AttentionMetadata
from nanovllm.ops.registry import define_op
from nanovllm.quant.weights import QuantizedWeight


@define_op("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and cast back before the weight (as HF does)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@define_op("add_rms_norm")
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Residual add then RMSNorm: returns (rms_norm(x + residual), x + residual)."""
    s = x + residual
    return rms_norm(s, weight, eps), s


@define_op("rope")
def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """Rotary embedding, NeoX layout (rotate halves). q: (N, Hq, D), k: (N, Hk, D), cos_sin: (P, D) fp32."""
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


@define_op("silu_and_mul")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for x = [gate | up] along the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@define_op("embedding")
def embedding(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `ids` of the (vocab, hidden) table, times `scale` (a tensor) rounded to the table's dtype, as HF
    scales Gemma's embeddings."""
    x = weight[ids]
    return x if scale is None else x * scale.to(x.dtype)


@define_op("linear")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias, weight (out, in) as stored by Hugging Face, or a QuantizedWeight (dequantized)."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias)
    return F.linear(x, weight, bias)


@define_op("store_kv", reads_kv=True)
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """Write new K/V rows (N, Hk, D) into the paged cache (blocks, block_size, Hk, D) at flat slots; with
    kv_scales (2, Hk) the cache is fp8 and holds round(k / kv_scales[0]), round(v / kv_scales[1])."""
    if kv_scales is not None:
        k, v = kv_quant.quantize(k, kv_scales[0]), kv_quant.quantize(v, kv_scales[1])
    torch.ops.nanovllm.store_kv(k, v, k_cache, v_cache, slot_mapping)


# A custom op, so torch.compile calls it on the caches in place: Inductor on CUDA lowered the plain
# index_copy_ (and index_put_) into a pass over the whole cache plus a copy back, per layer and step.
@torch.library.custom_op("nanovllm::store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    if k_cache.dtype == kv_quant.FP8:  # index_copy_ has no fp8 kernel on every device: copy the bytes
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


# K/V and score elements (after the float32 cast and GQA repeat) one chunk of requests may hold: a decode
# step of 256 requests over 4,096-token block tables would otherwise gather ~17 GB per layer (in a CUDA graph).
GATHER_ELEMENTS = 1 << 26


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, window: int = 0, softcap: float = 0.0,
                    kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed queries over each request's paged KV, in float32 (or float64). With
    kv_scales (2, Hk) the cache is fp8: the pages read are dequantized (times the head's scale) first.

    Queries are scattered into a (B, max_q) padded layout; keys are gathered per request from its
    block table, a chunk of requests at a time. A key is visible when its position <= the query's (and
    within `window` if > 0).
    """
    num_seqs, max_q = meta.num_seqs, meta.max_seqlen_q
    n_heads, head_dim = q.shape[1], q.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qp = q.new_zeros(num_seqs * max_q, n_heads, head_dim).index_copy_(0, meta.pad_index, q)
    qp = qp.view(num_seqs, max_q, n_heads, head_dim).to(acc).transpose(1, 2)  # (B, H, Lq, D)
    q_pos = meta.positions.new_zeros(num_seqs * max_q).index_copy_(0, meta.pad_index, meta.positions)
    q_pos = q_pos.view(num_seqs, 1, max_q, 1)
    num_keys = meta.block_tables.shape[1] * k_cache.shape[1]
    rows = max(1, GATHER_ELEMENTS // (n_heads * num_keys * (head_dim + max_q)))  # K, V and the scores
    if rows >= num_seqs:
        out = _attend(qp, q_pos, k_cache, v_cache, meta.block_tables, scale, window, softcap, kv_scales)
    else:
        out = _attend_chunks(rows, qp, q_pos, k_cache, v_cache, meta.block_tables, scale, window, softcap, kv_scales)
    out = out.transpose(1, 2).reshape(num_seqs * max_q, n_heads, head_dim)
    return out[meta.pad_index].to(q.dtype)


@torch.compiler.disable  # a loop over a batch-dependent chunk count would recompile for every batch size
def _attend_chunks(rows: int, qp, q_pos, k_cache, v_cache, block_tables, *args) -> torch.Tensor:
    return torch.cat([_attend(qp[i:i + rows], q_pos[i:i + rows], k_cache, v_cache, block_tables[i:i + rows], *args)
                      for i in range(0, qp.shape[0], rows)])


def _attend(qp, q_pos, k_cache, v_cache, block_tables, scale: float, window: int, softcap: float,
            kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, Lq, D) padded queries at positions q_pos against the keys of their block tables."""
    k_scale, v_scale = (None, None) if kv_scales is None else kv_scales
    k = kv_quant.dequantize(k_cache[block_tables].flatten(1, 2), k_scale, qp.dtype).transpose(1, 2)  # (B, Hk, Lk, D)
    v = kv_quant.dequantize(v_cache[block_tables].flatten(1, 2), v_scale, qp.dtype).transpose(1, 2)
    group = qp.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    k_pos = torch.arange(k.shape[2], device=qp.device).view(1, 1, 1, -1)
    visible = k_pos <= q_pos
    if window > 0:
        visible = visible & (k_pos > q_pos - window)
    scores = (qp @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v


@define_op("attention_prefill", reads_kv=True)
def attention_prefill(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int = 0,
                      softcap: float = 0.0, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for a step with prompt chunks (any query lengths, prefix-cache hits included)."""
    return paged_attention(q, k_cache, v_cache, meta, scale, window, softcap, kv_scales)


@define_op("attention_decode", reads_kv=True)
def attention_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int = 0,
                     softcap: float = 0.0, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for a pure decode step: one query per request."""
    return paged_attention(q, k_cache, v_cache, meta, scale, window, softcap, kv_scales)


@define_op("sample")
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
           min_p: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """Next token per row. temperature 0 is greedy; top_k <= 0, top_p 1, min_p 0 disable their filter, and
    a filter passed as None is off for every row (then no sort of the vocabulary is needed).

    Sampling is argmax(probs / noise) with noise ~ Exp(1) drawn by the caller (the exponential race:
    exact categorical sampling, no host sync, reproducible from per-request generators).
    """
    greedy = logits.argmax(dim=-1)
    if noise is None:
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-5).unsqueeze(1)
    if top_k is None and top_p is None and min_p is None:
        return torch.where(temperature == 0, greedy, (scaled.softmax(dim=-1) / noise).argmax(dim=-1))
    top_k, top_p, min_p = filters_or_off(top_k, top_p, min_p, temperature)
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).unsqueeze(1)
    drop = rank >= k
    probs = sorted_logits.softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)  # keep the smallest set reaching top_p
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.empty_like(scaled).scatter_(1, sorted_idx, sorted_logits)
    sampled = (filtered.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(temperature == 0, greedy, sampled)


def filters_or_off(top_k, top_p, min_p, like: torch.Tensor):
    """The three sampling filters with None replaced by per-row tensors that switch the filter off."""
    return (torch.full_like(like, -1, dtype=torch.int64) if top_k is None else top_k,
            torch.ones_like(like) if top_p is None else top_p,
            torch.zeros_like(like) if min_p is None else min_p)
