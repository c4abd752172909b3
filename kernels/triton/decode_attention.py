"""Backend `triton` of `attention_decode`: split-KV flash decoding over the paged cache (one query per request).

Kernel 1, grid (request, kv head, split): the program loads the GQA group's query heads as one tile,
walks its share of the request's keys page by page through the block table (online softmax, exp2), and
writes its partial output and log-sum-exp. Kernel 2, grid (request, q head): merges the splits. Backend
`triton_onepass` (experimental) skips kernel 2: the last split of a (request, kv head) to finish (an
arrival counter) merges its group's heads.
The split count depends only on shapes (batch, heads, block-table width), never on the step's lengths,
so a captured CUDA graph stays valid as contexts grow; splits past a request's keys exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")
gdc_launch_dependents, gdc_wait, arrive_last = core.gdc_launch_dependents, core.gdc_wait, core.arrive_last
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # jit code reads only constexpr globals
BLOCK_KV = 64


@triton.jit
def norm_rope_heads(x_ptr, stride_h, heads, mask_h, w_ptr, cs_ptr, pos, head_dim, eps, HAS_NORM: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Heads `heads` of one token's (heads, head_dim) q or k: per-head RMSNorm (HAS_NORM), then NeoX RoPE at
    `pos` from the (positions, head_dim) cos|sin table; rounded where the native ops round."""
    half = head_dim // 2
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_h[:, None] & (offs_d < head_dim)[None, :]
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)  # the other element of the rotated pair
    x = tl.load(x_ptr + heads[:, None] * stride_h + offs_d[None, :], mask=mask, other=0.0)
    xp = tl.load(x_ptr + heads[:, None] * stride_h + partner[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    x, xp = x.to(tl.float32), xp.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)[:, None]
        w = tl.load(w_ptr + offs_d, mask=offs_d < head_dim, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + partner, mask=offs_d < head_dim, other=0.0).to(tl.float32)[None, :]
        x = (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xp = (wp * (xp * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    c = offs_d % half
    cos = tl.load(cs_ptr + pos * head_dim + c, mask=offs_d < head_dim, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * head_dim + half + c, mask=offs_d < head_dim, other=0.0)[None, :]
    sign = tl.where(offs_d < half, -1.0, 1.0)[None, :]  # x1 cos - x2 sin | x2 cos + x1 sin
    return (x * cos + sign * xp * sin).to(dtype)


@triton.jit
def write_new_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, b, kh, stride_nkb, stride_nkh, stride_nvb, stride_nvh,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, page, kw_ptr, cs_ptr, pos, head_dim,
                 eps, HAS_NORM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """This step's key (normed, rotated) and value of request b, kv head kh, into the paged caches."""
    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    row = offs_g == 0  # a one-row tile in the shape of the query's
    k = norm_rope_heads(k_ptr + b * stride_nkb, stride_nkh, kh + offs_g * 0, row, kw_ptr, cs_ptr, pos, head_dim, eps,
                        HAS_NORM, BLOCK_D)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    blk, r = slot // page, slot % page
    mask = row[:, None] & (offs_d < head_dim)[None, :]
    cols = offs_g[:, None] * 0 + offs_d[None, :]  # every row of the tile at the same head
    tl.store(kc_ptr + blk * stride_kb + r * stride_ks + kh * stride_kh + cols, k.to(kc_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + b * stride_nvb + kh * stride_nvh + cols, mask=mask)
    tl.store(vc_ptr + blk * stride_vb + r * stride_vs + kh * stride_vh + cols, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, o_ptr, lse_ptr, out_ptr, count_ptr, stride_qb,
                         stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, page,
                         group, head_dim, qk_scale, softcap, window, num_splits, stride_ob, stride_oh,
                         k_ptr, v_ptr, qw_ptr, kw_ptr, cs_ptr, slot_ptr, stride_nkb, stride_nkh, stride_nvb,
                         stride_nvh, eps, ROPE: tl.constexpr, HAS_NORM: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, DIRECT: tl.constexpr, MERGE: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         DOT_F32: tl.constexpr, PDL: tl.constexpr):
    """Grid (request, kv head, split). ROPE: q, k, v are this step's raw projections; the query heads are
    normed and rotated here, and the split that holds the newest position writes its key and value into
    the caches before it reads them (q/k norm + RoPE + KV write fused, one launch fewer per layer)."""
    if PDL:  # the K/V of this step are written by the kernel before (or q, k, v computed): wait before any load
        gdc_launch_dependents()
        gdc_wait()
    b, kh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_len = tl.load(pos_ptr + b).to(tl.int32) + 1  # keys at positions <= the query's
    lo = tl.where(window > 0, tl.maximum(kv_len - window, 0), 0)  # sliding window: the last `window` keys
    span = tl.cdiv(tl.cdiv(kv_len - lo, num_splits), BLOCK_KV) * BLOCK_KV
    start = lo + split * span
    stop = tl.minimum(kv_len, start + span)
    offs_g, offs_d, offs_n = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_KV)
    heads = kh * group + offs_g
    mask_g, mask_d = offs_g < group, offs_d < head_dim
    if ROPE:
        q = norm_rope_heads(q_ptr + b * stride_qb, stride_qh, heads, mask_g, qw_ptr, cs_ptr, kv_len - 1, head_dim,
                            eps, HAS_NORM, BLOCK_D)
        if (start <= kv_len - 1) & (kv_len - 1 < stop):
            write_new_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, b, kh, stride_nkb, stride_nkh, stride_nvb, stride_nvh,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, page, kw_ptr, cs_ptr,
                         kv_len - 1, head_dim, eps, HAS_NORM, BLOCK_G, BLOCK_D)
            tl.debug_barrier()  # the block's own stores are visible to all its threads after the barrier
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for n0 in range(start, stop, BLOCK_KV):
        pos = n0 + offs_n
        mask_n = pos < stop
        blk = tl.load(bt_ptr + b * stride_bt + pos // page, mask=mask_n, other=0).to(tl.int64)
        row = pos % page
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(kc_ptr + blk[:, None] * stride_kb + row[:, None] * stride_ks + kh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if HAS_SOFTCAP:  # softcap * tanh(s * scale / softcap), tanh through exp2 (no tanh in tl core)
            t = tl.exp2(s * (qk_scale * 2 * LOG2E / softcap))
            s = softcap * (1 - 2 / (t + 1)) * LOG2E
        else:
            s = s * (qk_scale * LOG2E)
        # Inductor passes Python floats as fp64: keep the softmax state (and the dot's accumulator) in fp32
        s = tl.where(mask_n[None, :], s.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + blk[:, None] * stride_vb + row[:, None] * stride_vs + kh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if DOT_F32:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    has = l_i > 0  # an empty split (past the keys) contributes weight 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:  # one split: this is the answer, no merge launch
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        base = (b * tl.num_programs(1) * group + heads) * num_splits + split  # o: (B, Hq, S, D), lse: (B, Hq, S)
        tl.store(o_ptr + base[:, None] * BLOCK_D + offs_d[None, :], out, mask=mask_g[:, None])
        tl.store(lse_ptr + base, lse, mask=mask_g)
        if MERGE:  # the last split of this (request, kv head) to finish merges the group's heads
            if arrive_last(count_ptr + b * tl.num_programs(1) + kh, num_splits):
                for g in range(group):
                    merge_head(o_ptr, lse_ptr, out_ptr, b, kh * group + g, tl.num_programs(1) * group, num_splits,
                               stride_ob, stride_oh, head_dim, BLOCK_S, BLOCK_D)


@triton.jit
def merge_head(o_ptr, lse_ptr, out_ptr, b, h, num_heads, num_splits, stride_ob, stride_oh, head_dim,
               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, h] = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse). The partials come from other
    programs, possibly of this very kernel: loaded past L1 (.cg)."""
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    base = (b * num_heads + h) * num_splits
    lse = tl.load(lse_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"), cache_modifier=".cg")
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(o_ptr + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=(offs_s < num_splits)[:, None],
                other=0.0, cache_modifier=".cg")
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < head_dim)


@triton.jit
def _decode_merge_kernel(o_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, num_splits, head_dim,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Grid (request, q head): one merge_head each."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    merge_head(o_ptr, lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), tl.num_programs(1), num_splits,
               stride_ob, stride_oh, head_dim, BLOCK_S, BLOCK_D)


def num_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """About two programs per SM, each with at least two key blocks of the widest possible context."""
    sms = core.tuning.num_sms(device)
    return max(1, min(triton.cdiv(2 * sms, batch * kv_heads), triton.cdiv(capacity, 2 * BLOCK_KV), 64))


def launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, onepass, rope=None):
    """The split kernel (and the merge kernel unless one split or `onepass`); rope: (k, v, q_norm_w, k_norm_w,
    eps, cos_sin, slot_mapping) when q, k, v are raw projections to norm, rotate and write first."""
    batch, hq, d = q.shape
    page, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    splits = splits or num_splits(batch, hk, block_tables.shape[1] * page, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_s = triton.next_power_of_2(splits)
    o = q.new_empty(batch, hq, splits, block_d, dtype=torch.float32)
    lse = q.new_empty(batch, hq, splits, dtype=torch.float32)
    out = q.new_empty(batch, hq, d)
    pdl = core.pdl(q, k_cache)
    count = core.counters(q.device, batch * hk) if onepass and splits > 1 else None
    k, v, q_norm_w, k_norm_w, eps, cos_sin, slots = rope or (q, q, None, None, 0.0, q, positions)
    if batch:
        wrap_triton(_decode_split_kernel)[(batch, hk, splits)](
            q, k_cache, v_cache, block_tables, positions, o, lse, out, count if count is not None else lse,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
            v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), page, group, d, scale, softcap, window,
            splits, out.stride(0), out.stride(1), k, v, q_norm_w, k_norm_w, cos_sin, slots, k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), eps, ROPE=rope is not None, HAS_NORM=q_norm_w is not None,
            HAS_SOFTCAP=softcap > 0, DIRECT=splits == 1, MERGE=count is not None,
            BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_KV=BLOCK_KV, BLOCK_D=block_d, BLOCK_S=block_s,
            DOT_F32=core.dot_f32(q), PDL=pdl, num_warps=4, num_stages=2, **core.launch_opts(pdl))
    if batch and splits > 1 and count is None:
        wrap_triton(_decode_merge_kernel)[(batch, hq)](
            o, lse, out, out.stride(0), out.stride(1), splits, d, BLOCK_S=block_s, BLOCK_D=block_d, PDL=pdl,
            num_warps=4, **core.launch_opts(pdl))
    return out


@triton_op("nanovllm_triton::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     positions: torch.Tensor, scale: float, window: int, softcap: float, splits: int,
                     onepass: bool = False) -> torch.Tensor:
    """Attention of one query per request (q: (B, Hq, D)) over its paged keys; splits=0 picks the count;
    `onepass` merges the splits in the split kernel (no second launch)."""
    return launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, onepass)


@triton_op("nanovllm_triton::rope_decode_attention", mutates_args=("k_cache", "v_cache"))
def rope_decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_w: torch.Tensor | None,
                             k_norm_w: torch.Tensor | None, eps: float, positions: torch.Tensor, cos_sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             block_tables: torch.Tensor, scale: float, window: int, softcap: float, splits: int,
                             onepass: bool = False) -> torch.Tensor:
    """decode_attention(rope(q_norm(q))) after writing rope(k_norm(k)) and v at slot_mapping: raw q, k, v
    (strided views of the packed projection, unit last stride) in, one launch fewer than the two ops."""
    d = q.shape[-1]
    assert d % 2 == 0 and q.stride(2) == k.stride(2) == v.stride(2) == 1, "head_dim must be even and contiguous"
    assert cos_sin.shape[1] == d and cos_sin.is_contiguous(), "cos_sin must be a contiguous (positions, head_dim) table"
    rope = (k, v, q_norm_w, k_norm_w, eps, cos_sin, slot_mapping)
    return launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, onepass, rope)


def attention_decode(q, k_cache, v_cache, meta, scale: float, window: int = 0, softcap: float = 0.0):
    """Split-KV paged decode attention (GQA groups share their K/V loads)."""
    return torch.ops.nanovllm_triton.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.positions,
                                                      float(scale), int(window), float(softcap), 0)


def attention_decode_onepass(q, k_cache, v_cache, meta, scale: float, window: int = 0, softcap: float = 0.0):
    """Split-KV paged decode attention, the splits merged by the last of them to finish (one launch)."""
    return torch.ops.nanovllm_triton.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.positions,
                                                      float(scale), int(window), float(softcap), 0, True)


def rope_decode_attention(q, k, v, q_norm_w, k_norm_w, eps: float, positions, cos_sin, k_cache, v_cache, meta,
                          scale: float, window: int = 0, softcap: float = 0.0, *, parts, onepass: bool = False):
    """q/k norm + RoPE + KV write inside the split-KV decode attention kernel."""
    return torch.ops.nanovllm_triton.rope_decode_attention(
        q, k, v, q_norm_w, k_norm_w, float(eps), positions, cos_sin, k_cache, v_cache, meta.slot_mapping,
        meta.block_tables, float(scale), int(window), float(softcap), 0, onepass)


def rope_decode_attention_onepass(*args, parts):
    """q/k norm + RoPE + KV write inside the decode attention kernel, the splits merged in it too."""
    return rope_decode_attention(*args, parts=parts, onepass=True)


def _check(shapes: dict) -> str | None:
    """head_dim <= 256, heads a multiple of kv_heads"""
    d, h, hk = shapes.get("head_dim", 128), shapes.get("heads", 1), shapes.get("kv_heads", 1)
    if d > 256:
        return f"head_dim {d} > 256"
    return f"{h} heads are not a multiple of {hk} kv heads" if h % hk else None


def _check_rope(shapes: dict) -> str | None:
    """head_dim even and <= 256, heads a multiple of kv_heads"""
    d = shapes.get("head_dim", 128)
    return f"head_dim {d} is odd" if d % 2 else _check(shapes)


for _backend, _fn in (("triton", attention_decode), ("triton_onepass", attention_decode_onepass)):
    register_impl("attention_decode", _backend, devices=core.devices(), dtypes=core.DTYPES, check=_check)(_fn)
core.register_site("rope_decode_attention", rope_decode_attention, check=_check_rope, gemv_rows=False)
core.register_site("rope_decode_attention", rope_decode_attention_onepass, check=_check_rope, gemv_rows=False,
                   backend="triton_onepass")
