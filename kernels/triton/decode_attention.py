"""Backend `triton` of `attention_decode` and `rope_decode_attention`: split-KV flash decoding over the paged cache
(one query per request).

Kernel 1, grid (request, kv head, split): the program loads the GQA group's query heads as one tile,
walks its share of the request's keys page by page through the block table (online softmax, exp2), and
writes its partial output and log-sum-exp. Kernel 2, grid (request, q head): merges the splits (none
with one split: kernel 1 writes the output).
The split count depends only on shapes (batch, heads, block-table width), never on the step's lengths,
so a captured CUDA graph stays valid as contexts grow; splits past a request's keys exit at once.
A speculative verify step is decode-shaped: each of a request's k + 1 rows is a request of its own over the
same block table, and a row at position p sees keys 0..p, so causality within the drafts comes from the
positions alone. Each row reads its request's K/V again, which costs little next to the weights at the few
rows verification runs at.
An fp8 cache (kv_scales given: the (2, kv_heads) K and V scales) is read and written through its per-head
scales (_decode_core.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import kv_quant, register_impl
from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.registry import declare_kv_dtypes
from nanovllm.ops.workspace import workspace

core = load_sibling(__file__, "_gemv_core")
attn = load_sibling(__file__, "_decode_core")
gdc_launch_dependents, gdc_wait = core.gdc_launch_dependents, core.gdc_wait
split_program, merge_head, num_splits, BLOCK_KV = attn.split_program, attn.merge_head, attn.num_splits, attn.BLOCK_KV


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, o_ptr, lse_ptr, out_ptr, stride_qb,
                         stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, page,
                         group, head_dim, qk_scale, softcap, window, num_splits, stride_ob, stride_oh,
                         k_ptr, v_ptr, qw_ptr, kw_ptr, cs_ptr, slot_ptr, stride_nkb, stride_nkh, stride_nvb,
                         stride_nvh, eps, kvs_ptr, ROPE: tl.constexpr, HAS_NORM: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, DIRECT: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                         PREFETCH: tl.constexpr, KV_POLICY: tl.constexpr, KV_FP8: tl.constexpr):
    """Grid (request, kv head, split): one split_program each (ROPE: q/k norm + RoPE + KV write fused, one
    launch fewer per layer). PREFETCH (the q/k norm weights are Parameters): split_program loads its constants
    before it waits for the kernel before; otherwise the wait comes first."""
    if PDL and not PREFETCH:
        gdc_launch_dependents()
        gdc_wait()
    split_program(q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, o_ptr, lse_ptr, out_ptr, tl.program_id(0),
                  tl.program_id(1), tl.program_id(2), tl.num_programs(1), stride_qb, stride_qh, stride_kb, stride_ks,
                  stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, page, group, head_dim, qk_scale, softcap,
                  window, num_splits, stride_ob, stride_oh, k_ptr, v_ptr, qw_ptr, kw_ptr, cs_ptr, slot_ptr,
                  stride_nkb, stride_nkh, stride_nvb, stride_nvh, eps, ROPE, HAS_NORM, HAS_SOFTCAP, DIRECT,
                  BLOCK_G, BLOCK_KV, BLOCK_D, DOT_F32, PREFETCH, KV_POLICY, kvs_ptr, KV_FP8)


@triton.jit
def _decode_merge_kernel(o_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, num_splits, head_dim,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Grid (request, q head): one merge_head each."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    merge_head(o_ptr, lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), tl.num_programs(1), num_splits,
               stride_ob, stride_oh, head_dim, BLOCK_S, BLOCK_D)


def split_warps(batch: int) -> int:
    """8 warps for the few-row steps (latency-bound, few keys a program: more loads in flight per program);
    4 for larger batches. The measurements behind the choice are in benchmarks/RESULTS.md."""
    return 8 if batch <= core.tuning.MAX_M else 4


def launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, rope=None, kv_scales=None):
    """The split kernel (and the merge kernel unless one split); rope: (k, v, q_norm_w, k_norm_w, eps,
    cos_sin, slot_mapping) when q, k, v are raw projections to norm, rotate and write first; kv_scales: an
    fp8 cache's (2, kv_heads) float32 scales."""
    batch, hq, d = q.shape
    page, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    splits = splits or num_splits(batch, hk, block_tables.shape[1] * page, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_s = triton.next_power_of_2(splits)
    o = workspace("decode_attention_partial_out", (batch, hq, splits, block_d), torch.float32, q)
    lse = workspace("decode_attention_partial_lse", (batch, hq, splits), torch.float32, q)
    out = q.new_empty(batch, hq, d)
    pdl = core.pdl(q, k_cache)
    k, v, q_norm_w, k_norm_w, eps, cos_sin, slots = rope or (q, q, None, None, 0.0, q, positions)
    if batch:
        wrap_triton(_decode_split_kernel)[(batch, hk, splits)](
            q, k_cache, v_cache, block_tables, positions, o, lse, out,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
            v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), page, group, d, scale, softcap, window,
            splits, out.stride(0), out.stride(1), k, v, q_norm_w, k_norm_w, cos_sin, slots, k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), eps, kv_scales, ROPE=rope is not None, HAS_NORM=q_norm_w is not None,
            HAS_SOFTCAP=softcap > 0, DIRECT=splits == 1, BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_KV=BLOCK_KV, BLOCK_D=block_d, DOT_F32=core.dot_f32(q), PDL=pdl,
            PREFETCH=core.prefetch(pdl, q_norm_w, k_norm_w), KV_POLICY=attn.kv_policy(batch),
            KV_FP8=kv_scales is not None,
            num_warps=split_warps(batch), num_stages=2, **core.launch_opts(pdl))
    if batch and splits > 1:
        wrap_triton(_decode_merge_kernel)[(batch, hq)](
            o, lse, out, out.stride(0), out.stride(1), splits, d, BLOCK_S=block_s, BLOCK_D=block_d, PDL=pdl,
            num_warps=4, **core.launch_opts(pdl))
    return out


@triton_op("nanovllm_triton::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     positions: torch.Tensor, scale: float, window: int, softcap: float, splits: int,
                     kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per request (q: (B, Hq, D)) over its paged keys; splits=0 picks the count."""
    return launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, kv_scales=kv_scales)


@triton_op("nanovllm_triton::rope_decode_attention", mutates_args=("k_cache", "v_cache"))
def rope_decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_w: torch.Tensor | None,
                             k_norm_w: torch.Tensor | None, eps: float, positions: torch.Tensor, cos_sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             block_tables: torch.Tensor, scale: float, window: int, softcap: float,
                             splits: int, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """decode_attention(rope(q_norm(q))) after writing rope(k_norm(k)) and v at slot_mapping: raw q, k, v
    (strided views of the packed projection, unit last stride) in, one launch fewer than the two ops."""
    d = q.shape[-1]
    assert d % 2 == 0 and q.stride(2) == k.stride(2) == v.stride(2) == 1, "head_dim must be even and contiguous"
    assert cos_sin.shape[1] == d and cos_sin.is_contiguous(), "cos_sin must be a contiguous (positions, head_dim) table"
    rope = (k, v, q_norm_w, k_norm_w, eps, cos_sin, slot_mapping)
    return launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, rope, kv_scales)


def attention_decode(q, k_cache, v_cache, meta, scale: float, window: int = 0, softcap: float = 0.0,
                     kv_scales=None):
    """Split-KV paged decode attention (GQA groups share their K/V loads)."""
    return torch.ops.nanovllm_triton.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.positions,
                                                      float(scale), int(window), float(softcap), 0, kv_scales)


def rope_decode_attention(q, k, v, q_norm_w, k_norm_w, eps: float, positions, cos_sin, k_cache, v_cache, meta,
                          scale: float, window: int = 0, softcap: float = 0.0, kv_scales=None, *, parts):
    """q/k norm + RoPE + KV write inside the split-KV decode attention kernel (a verify step: two launches)."""
    return attn.rope_attention(q, k, v, q_norm_w, k_norm_w, eps, positions, cos_sin, k_cache, v_cache, meta, scale,
                               window, softcap, kv_scales)


register_impl("attention_decode", "triton", devices=core.devices(), dtypes=core.DTYPES, check=attn.check_attention,
              kv_dtypes=kv_quant.KV_CACHE_DTYPES)(attention_decode)
core.register_site("rope_decode_attention", rope_decode_attention, check=attn.check_rope_attention, gemv_rows=False)
declare_kv_dtypes("rope_decode_attention", "triton", kv_quant.KV_CACHE_DTYPES)
