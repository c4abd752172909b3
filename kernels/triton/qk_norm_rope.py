"""Backend `triton` of site `qk_norm_rope`: per-head q/k RMSNorm + NeoX RoPE + the paged K/V cache write.

One kernel, one program per token: it normalizes and rotates all q heads into the output and all k heads
straight into k_cache at the token's slot, and copies the v heads into v_cache. q, k, v may be strided
views of the packed qkv output. An fp8 cache (kv_scales given) stores K and V over their head's scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import kv_quant
from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.registry import declare_kv_dtypes

core = load_sibling(__file__, "_gemv_core")
attn = load_sibling(__file__, "_decode_core")
gdc_launch_dependents, gdc_wait, quantize_fp8 = core.gdc_launch_dependents, core.gdc_wait, attn.quantize_fp8


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, out_ptr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                         stride_kslot, stride_kch, stride_vslot, stride_vch, stride_ot, stride_oh,
                         HQ, HK, half, eps, kvs_ptr, HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr, KV_FP8: tl.constexpr):
    """Grid (tokens,): rows 0..HQ-1 of the tile are q heads, HQ..HQ+HK-1 k heads; columns are the two
    rotary halves. Rounds where the native rounds: after the norm (model dtype), after the rotation.
    KV_FP8: K and V are stored over their head's scale (kvs_ptr: the (2, HK) K and V scales)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h, offs = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK)
    is_q, is_k = h < HQ, (h >= HQ) & (h < HQ + HK)
    kh = h - HQ
    cols = (offs < half)[None, :]
    mq, mk = is_q[:, None] & cols, is_k[:, None] & cols
    q_src = q_ptr + t * stride_qt + h[:, None] * stride_qh + offs[None, :]
    k_src = k_ptr + t * stride_kt + kh[:, None] * stride_kh + offs[None, :]
    x1 = tl.where(mq, tl.load(q_src, mask=mq, other=0.0), tl.load(k_src, mask=mk, other=0.0))
    x2 = tl.where(mq, tl.load(q_src + half, mask=mq, other=0.0), tl.load(k_src + half, mask=mk, other=0.0))
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)[:, None]
        c = offs < half
        w1 = tl.where(is_q[:, None], tl.load(qw_ptr + offs, mask=c, other=0.0)[None, :],
                      tl.load(kw_ptr + offs, mask=c, other=0.0)[None, :]).to(tl.float32)
        w2 = tl.where(is_q[:, None], tl.load(qw_ptr + half + offs, mask=c, other=0.0)[None, :],
                      tl.load(kw_ptr + half + offs, mask=c, other=0.0)[None, :]).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    cos = tl.load(cs_ptr + pos * stride_cs + offs, mask=offs < half, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + half + offs, mask=offs < half, other=0.0)[None, :]
    o1, o2 = (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)
    q_dst = out_ptr + t * stride_ot + h[:, None] * stride_oh + offs[None, :]
    tl.store(q_dst, o1, mask=mq)
    tl.store(q_dst + half, o2, mask=mq)
    k_dst = kc_ptr + slot * stride_kslot + kh[:, None] * stride_kch + offs[None, :]
    d = tl.arange(0, 2 * BLOCK)
    mv = (h < HK)[:, None] & (d < 2 * half)[None, :]
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mv)
    if KV_FP8:
        k_scale = tl.load(kvs_ptr + kh, mask=is_k, other=1.0).to(tl.float32)[:, None]
        v_scale = tl.load(kvs_ptr + HK + h, mask=h < HK, other=1.0).to(tl.float32)[:, None]
        o1, o2 = quantize_fp8(o1, k_scale, kc_ptr), quantize_fp8(o2, k_scale, kc_ptr)
        v = quantize_fp8(v, v_scale, vc_ptr)
    tl.store(k_dst, o1.to(kc_ptr.dtype.element_ty), mask=mk)
    tl.store(k_dst + half, o2.to(kc_ptr.dtype.element_ty), mask=mk)
    tl.store(vc_ptr + slot * stride_vslot + h[:, None] * stride_vch + d[None, :], v.to(vc_ptr.dtype.element_ty),
             mask=mv)


@triton_op("nanovllm_triton::qk_norm_rope", mutates_args=("k_cache", "v_cache"))
def qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_w: torch.Tensor | None,
                    k_norm_w: torch.Tensor | None, eps: float, positions: torch.Tensor, cos_sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Returns rope(q_norm(q)); writes rope(k_norm(k)) and v into the caches at slot_mapping."""
    tokens, hq, d = q.shape
    hk = k.shape[1]
    assert d % 2 == 0 and q.stride(2) == k.stride(2) == v.stride(2) == 1, "head_dim must be even and contiguous"
    # a flat slot indexes (blocks * block_size) rows of (kv_heads, head_dim), as the native's view(-1, ...)
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1) and k_cache.stride(3) == 1
    assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1) and v_cache.stride(3) == 1
    out = q.new_empty(tokens, hq, d)
    block, block_h = triton.next_power_of_2(d // 2), triton.next_power_of_2(hq + hk)
    pdl = core.pdl(q, k_cache)
    if tokens:
        wrap_triton(_qk_norm_rope_kernel)[(tokens,)](
            q, k, v, q_norm_w, k_norm_w, positions, cos_sin, k_cache, v_cache, slot_mapping, out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
            k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
            hq, hk, d // 2, eps, kv_scales, HAS_NORM=q_norm_w is not None, BLOCK_H=block_h, BLOCK=block,
            PDL=pdl, KV_FP8=kv_scales is not None, num_warps=max(1, min(8, block_h * block // 512)),
            **core.launch_opts(pdl))
    return out


def qk_norm_rope(q, k, v, q_norm_w, k_norm_w, eps: float, positions, cos_sin, k_cache, v_cache, slot_mapping,
                 kv_scales=None, *, parts):
    """q/k norm, RoPE and the K/V cache write in one launch."""
    return torch.ops.nanovllm_triton.qk_norm_rope(q, k, v, q_norm_w, k_norm_w, eps, positions, cos_sin,
                                                  k_cache, v_cache, slot_mapping, kv_scales)


def _check(shapes: dict) -> str | None:
    """even head_dim"""
    d = shapes.get("head_dim", 2)
    return f"head_dim {d} is odd" if d % 2 else None


core.register_site("qk_norm_rope", qk_norm_rope, check=_check, gemv_rows=False)
declare_kv_dtypes("qk_norm_rope", "triton", kv_quant.KV_CACHE_DTYPES)
