"""Decode-attention building blocks of the Triton attention kernels (decode_attention.py, and plugins that
build on them): q/k norm + RoPE of a token's heads, the new key/value's cache write, one split of split-KV
flash decoding, and the merge of the splits.

KV_FP8: the caches hold float8_e4m3fn with one float32 scale per KV head (kvs_ptr: the (2, kv_heads) K and V
scales, see nanovllm/ops/kv_quant.py). Writes store round(x / scale) clamped to the format's range; reads
multiply the scores by the head's K scale and the output by its V scale."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")
gdc_launch_dependents, gdc_wait = core.gdc_launch_dependents, core.gdc_wait
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # jit code reads only constexpr globals
BLOCK_KV = 64
FP8_MAX: tl.constexpr = tl.constexpr(448.0)  # float8_e4m3fn's largest finite value


@triton.jit
def round_to_e4m3(y):
    """float32 y (within +-FP8_MAX) rounded to the nearest float8_e4m3fn value (ties to even), still float32,
    so the cast that follows is exact: the interpreter's own float32 -> fp8 rounding loses the carry when the
    mantissa rounds up. Normal range: 3 mantissa bits kept by integer rounding of the float32 pattern (a carry
    goes into the exponent); below 2^-6, a fixed grid of 2^-9: adding 2^14 leaves float32 that precision."""
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    a = tl.abs(y)
    tiny = (a + 16384.0) - 16384.0
    return tl.where(a < 0.015625, tl.where(bits < 0, -tiny, tiny), normal)


@triton.jit
def quantize_fp8(x, scale, dst_ptr):
    """x / scale, clamped to the fp8 range and rounded to nearest even, in dst_ptr's element type."""
    y = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -FP8_MAX), FP8_MAX)
    return round_to_e4m3(y).to(dst_ptr.dtype.element_ty)


@triton.jit
def partner_dims(head_dim, BLOCK_D: tl.constexpr):
    """For each dim, the other element of its NeoX-rotated pair."""
    offs_d, half = tl.arange(0, BLOCK_D), head_dim // 2
    return tl.where(offs_d < half, offs_d + half, offs_d - half)


@triton.jit
def rope_at(cs_ptr, pos, head_dim, BLOCK_D: tl.constexpr):
    """(cos, sin) per dim at `pos` from the (positions, head_dim) cos|sin table, (1, BLOCK_D) each."""
    offs_d, half = tl.arange(0, BLOCK_D), head_dim // 2
    c, mask_d = offs_d % half, offs_d < head_dim
    cos = tl.load(cs_ptr + pos * head_dim + c, mask=mask_d, other=0.0)
    sin = tl.load(cs_ptr + pos * head_dim + half + c, mask=mask_d, other=0.0)
    return cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]


@triton.jit
def head_norm_w(w_ptr, head_dim, HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(w, w at the partner dims) of a per-head RMSNorm, (1, BLOCK_D) fp32 each (ones without HAS_NORM)."""
    offs_d = tl.arange(0, BLOCK_D)
    if HAS_NORM:
        mask_d = offs_d < head_dim
        w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + partner_dims(head_dim, BLOCK_D), mask=mask_d, other=0.0).to(tl.float32)[None, :]
    else:
        w = tl.full((1, BLOCK_D), 1.0, tl.float32)
        wp = w
    return w, wp


@triton.jit
def load_heads(x_ptr, stride_h, heads, mask_h, head_dim, BLOCK_D: tl.constexpr):
    """Heads `heads` of one token's (heads, head_dim) q or k, and the same at the partner dims (for RoPE)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_h[:, None] & (offs_d < head_dim)[None, :]
    # .cg: x may come from another program of the calling kernel (L1 is not coherent across SMs)
    x = tl.load(x_ptr + heads[:, None] * stride_h + offs_d[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    xp = tl.load(x_ptr + heads[:, None] * stride_h + partner_dims(head_dim, BLOCK_D)[None, :], mask=mask, other=0.0,
                 cache_modifier=".cg")
    return x, xp


@triton.jit
def norm_rope(x, xp, w, wp, cos, sin, head_dim, eps, HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-head RMSNorm (HAS_NORM, weights w, wp from head_norm_w), then NeoX RoPE (cos, sin from rope_at) of
    heads loaded by load_heads; rounded where the native ops round. The constants come in as values: a kernel
    loads them before its PDL wait (per-layer weights are DRAM misses)."""
    offs_d = tl.arange(0, BLOCK_D)
    dtype = x.dtype
    x, xp = x.to(tl.float32), xp.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)[:, None]
        x = (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xp = (wp * (xp * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    sign = tl.where(offs_d < head_dim // 2, -1.0, 1.0)[None, :]  # x1 cos - x2 sin | x2 cos + x1 sin
    return (x * cos + sign * xp * sin).to(dtype)


@triton.jit
def write_new_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, slot, b, kh, stride_nkb, stride_nkh, stride_nvb, stride_nvh,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, page, kw, kwp, cos, sin, head_dim,
                 eps, HAS_NORM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, KV_POLICY: tl.constexpr,
                 k_scale=1.0, v_scale=1.0, KV_FP8: tl.constexpr = False):
    """This step's key (normed, rotated) and value of request b, kv head kh, into the paged caches at `slot`.
    The value loads with the key: after the key's store it would be a round trip of its own. KV_FP8: stored
    as fp8 over the head's k_scale and v_scale."""
    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    row = offs_g == 0  # a one-row tile in the shape of the query's
    mask = row[:, None] & (offs_d < head_dim)[None, :]
    cols = offs_g[:, None] * 0 + offs_d[None, :]  # every row of the tile at the same head
    kx, kxp = load_heads(k_ptr + b * stride_nkb, stride_nkh, kh + offs_g * 0, row, head_dim, BLOCK_D)
    v = tl.load(v_ptr + b * stride_nvb + kh * stride_nvh + cols, mask=mask, cache_modifier=".cg")
    k = norm_rope(kx, kxp, kw, kwp, cos, sin, head_dim, eps, HAS_NORM, BLOCK_D)
    blk, r = slot // page, slot % page
    if KV_FP8:
        k, v = quantize_fp8(k, k_scale, kc_ptr), quantize_fp8(v, v_scale, vc_ptr)
    tl.store(kc_ptr + blk * stride_kb + r * stride_ks + kh * stride_kh + cols, k.to(kc_ptr.dtype.element_ty), mask=mask,
             eviction_policy=KV_POLICY)
    tl.store(vc_ptr + blk * stride_vb + r * stride_vs + kh * stride_vh + cols, v.to(vc_ptr.dtype.element_ty), mask=mask,
             eviction_policy=KV_POLICY)


@triton.jit
def split_program(q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, o_ptr, lse_ptr, out_ptr, b, kh, split,
                  num_kv_heads, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_bt, page, group, head_dim, qk_scale, softcap, window, num_splits, stride_ob, stride_oh,
                  k_ptr, v_ptr, qw_ptr, kw_ptr, cs_ptr, slot_ptr, stride_nkb, stride_nkh, stride_nvb, stride_nvh, eps,
                  ROPE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DIRECT: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                  PREFETCH: tl.constexpr, KV_POLICY: tl.constexpr, kvs_ptr=None, KV_FP8: tl.constexpr = False):
    """Request b, kv head kh, split `split` of split-KV decoding: its share of the keys, page by page through
    the block table (online softmax, exp2), for the GQA group's query heads as one tile. DIRECT (one split):
    the output; else its partial output and log-sum-exp, for merge_head.
    ROPE: q, k, v are this step's raw projections; the query heads are normed and rotated here, and the split
    that holds the newest position writes its key and value into the caches before it reads them.
    PREFETCH: wait for the kernel before (programmatic dependent launch) here, once the constants are loaded
    (else the caller waits first, or has no kernel to wait for): the q/k norm weights (Parameters), the step's
    position, slot, cos|sin row and first key block's page ids (inputs no kernel of the step writes).
    Per-layer weights are DRAM misses, which after the wait would queue behind the weight prefetch of the
    kernels launched since. KV_POLICY: the L2 eviction policy of the
    cache's loads and stores (see kv_policy). KV_FP8: fp8 caches with per-head scales at kvs_ptr (module
    docstring); the scales load with the other constants."""
    kv_len = tl.load(pos_ptr + b).to(tl.int32) + 1  # keys at positions <= the query's
    lo = tl.where(window > 0, tl.maximum(kv_len - window, 0), 0)  # sliding window: the last `window` keys
    span = tl.cdiv(tl.cdiv(kv_len - lo, num_splits), BLOCK_KV) * BLOCK_KV
    start = lo + split * span
    stop = tl.minimum(kv_len, start + span)
    offs_g, offs_d, offs_n = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_KV)
    heads = kh * group + offs_g
    mask_g, mask_d = offs_g < group, offs_d < head_dim
    # the first key block's page ids before the wait (see PREFETCH), each later block's one block ahead: the K/V
    # loads after the wait need no block-table round trip first
    nxt_blk = tl.load(bt_ptr + b * stride_bt + (start + offs_n) // page, mask=(start + offs_n) < stop, other=0)
    if ROPE:
        qw, qwp = head_norm_w(qw_ptr, head_dim, HAS_NORM, BLOCK_D)
        kw, kwp = head_norm_w(kw_ptr, head_dim, HAS_NORM, BLOCK_D)
        cos, sin = rope_at(cs_ptr, kv_len - 1, head_dim, BLOCK_D)
        slot = tl.load(slot_ptr + b).to(tl.int64)
    k_scale, v_scale = 1.0, 1.0
    if KV_FP8:
        k_scale = tl.load(kvs_ptr + kh).to(tl.float32)
        v_scale = tl.load(kvs_ptr + num_kv_heads + kh).to(tl.float32)
    if PREFETCH:  # q, k, v come from the kernel before (without ROPE: this step's key and value in the caches)
        gdc_launch_dependents()
        gdc_wait()
    if ROPE:
        # q's loads first, then the new key's and value's: all in flight together, one round trip
        qx, qxp = load_heads(q_ptr + b * stride_qb, stride_qh, heads, mask_g, head_dim, BLOCK_D)
        if (start <= kv_len - 1) & (kv_len - 1 < stop):
            write_new_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, slot, b, kh, stride_nkb, stride_nkh, stride_nvb, stride_nvh,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, page, kw, kwp, cos, sin,
                         head_dim, eps, HAS_NORM, BLOCK_G, BLOCK_D, KV_POLICY, k_scale, v_scale, KV_FP8)
            tl.debug_barrier()  # the block's own stores are visible to all its threads after the barrier
        q = norm_rope(qx, qxp, qw, qwp, cos, sin, head_dim, eps, HAS_NORM, BLOCK_D)
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for n0 in range(start, stop, BLOCK_KV):
        pos = n0 + offs_n
        mask_n = pos < stop
        blk = nxt_blk.to(tl.int64)  # loaded a block ahead
        nxt_blk = tl.load(bt_ptr + b * stride_bt + (pos + BLOCK_KV) // page, mask=(pos + BLOCK_KV) < stop, other=0)
        row = pos % page
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(kc_ptr + blk[:, None] * stride_kb + row[:, None] * stride_ks + kh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0, eviction_policy=KV_POLICY)
        if KV_FP8:
            k = k.to(q.dtype)  # exact: e4m3 values are bf16/fp16/fp32 values
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if KV_FP8:
            s = s.to(tl.float32) * k_scale
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
                    mask=kv_mask, other=0.0, eviction_policy=KV_POLICY)
        if KV_FP8:
            v = v.to(q.dtype)
        if DOT_F32:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    has = l_i > 0  # an empty split (past the keys) contributes weight 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * v_scale
    if DIRECT:  # one split: this is the answer, no merge launch
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        base = (b * num_kv_heads * group + heads) * num_splits + split  # o: (B, Hq, S, D), lse: (B, Hq, S)
        tl.store(o_ptr + base[:, None] * BLOCK_D + offs_d[None, :], out, mask=mask_g[:, None])
        tl.store(lse_ptr + base, lse, mask=mask_g)


@triton.jit
def merge_head(o_ptr, lse_ptr, out_ptr, b, h, num_heads, num_splits, stride_ob, stride_oh, head_dim,
               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, h] = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse). The partials come from other
    programs, possibly of the calling kernel: loaded past L1 (.cg)."""
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    base = (b * num_heads + h) * num_splits
    lse = tl.load(lse_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"), cache_modifier=".cg")
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(o_ptr + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=(offs_s < num_splits)[:, None],
                other=0.0, cache_modifier=".cg")
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < head_dim)


def kv_policy(batch: int) -> str:
    """"evict_last" for a few rows' caches: with the weights streamed "evict_first" (_gemv_core), a short
    context's keys and values stay in L2 from one step to the next (the whole model's cache at context 128
    fits the L2 of an H100); a large batch's cache would only crowd out the GEMMs' reused tiles."""
    return "evict_last" if batch <= core.tuning.MAX_M else ""


def num_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """About two programs per SM, and no more splits than key blocks in the widest possible context (a
    narrower block table, as the short-context decode graphs give, means fewer splits of one block each)."""
    sms = core.tuning.num_sms(device)
    return max(1, min(triton.cdiv(2 * sms, batch * kv_heads), triton.cdiv(capacity, BLOCK_KV), 64))


def check_attention(shapes: dict) -> str | None:
    """head_dim <= 256, heads a multiple of kv_heads"""
    d, h, hk = shapes.get("head_dim", 128), shapes.get("heads", 1), shapes.get("kv_heads", 1)
    if d > 256:
        return f"head_dim {d} > 256"
    return f"{h} heads are not a multiple of {hk} kv heads" if h % hk else None


def check_rope_attention(shapes: dict) -> str | None:
    """head_dim even and <= 256, heads a multiple of kv_heads"""
    d = shapes.get("head_dim", 128)
    return f"head_dim {d} is odd" if d % 2 else check_attention(shapes)


def rope_attention(q, k, v, q_norm_w, k_norm_w, eps: float, positions, cos_sin, k_cache, v_cache, meta,
                   scale: float, window: int, softcap: float, kv_scales=None) -> torch.Tensor:
    """q/k norm + RoPE + KV write + split-KV decode attention of raw q, k, v: one kernel for a decode step. A
    verify step's rows attend to the K/V that the rows before them write (AttentionMetadata.verify), which one
    kernel's programs cannot order, so it writes every row's K/V in a launch of its own first."""
    ops = torch.ops.nanovllm_triton
    scale, window, softcap = float(scale), int(window), float(softcap)
    if meta.verify:
        q = ops.qk_norm_rope(q, k, v, q_norm_w, k_norm_w, float(eps), positions, cos_sin, k_cache, v_cache,
                             meta.slot_mapping, kv_scales)
        return ops.decode_attention(q, k_cache, v_cache, meta.block_tables, positions, scale, window, softcap, 0,
                                    kv_scales)
    return ops.rope_decode_attention(q, k, v, q_norm_w, k_norm_w, float(eps), positions, cos_sin, k_cache, v_cache,
                                     meta.slot_mapping, meta.block_tables, scale, window, softcap, 0, kv_scales)
