"""Backends `triton_onepass` of `attention_decode`, `rope_decode_attention` and `attn_out` (experimental, preset
`onepass`): each site's second kernel folded into its first, done by the last program to finish (an arrival
counter), to save a launch per layer.

- attention: the last split of a (request, kv head) to finish merges its group's query heads (no merge launch);
- attn_out: the last GEMV program to finish sums the partials, adds the residual and normalizes every row.
Without counters (torch.compile tracing, a CUDA-graph capture before any eager call) they run the shipped
two-kernel `triton` backends. They lost against those (benchmarks/RESULTS.md, "what we tried that lost").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_builtin, load_sibling

core = load_builtin("triton/_gemv_core")
attn = load_builtin("triton/_decode_core")
decode = load_builtin("triton/decode_attention")
attn_out_site = load_builtin("triton/attn_out")
arrival = load_sibling(__file__, "_arrival")
BACKEND = "triton_onepass"
gdc_launch_dependents, gdc_wait, arrive_last = core.gdc_launch_dependents, core.gdc_wait, arrival.arrive_last
split_program, merge_head, add_rms_norm_row = attn.split_program, attn.merge_head, attn_out_site.add_rms_norm_row
program_tile, store_partial = core.program_tile, core.store_partial


# -- decode attention ---------------------------------------------------------------------------------------
@triton.jit
def _split_merge_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, o_ptr, lse_ptr, out_ptr, count_ptr, stride_qb,
                        stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, page,
                        group, head_dim, qk_scale, softcap, window, num_splits, stride_ob, stride_oh,
                        k_ptr, v_ptr, qw_ptr, kw_ptr, cs_ptr, slot_ptr, stride_nkb, stride_nkh, stride_nvb,
                        stride_nvh, eps, ROPE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        DOT_F32: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, KV_POLICY: tl.constexpr):
    """Grid (request, kv head, split > 1): split_program's partials, then the last split of the (request, kv
    head) to arrive merges the group's heads; it leaves the counter at zero."""
    if PDL and not PREFETCH:
        gdc_launch_dependents()
        gdc_wait()
    b, kh, num_kv_heads = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    split_program(q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, o_ptr, lse_ptr, out_ptr, b, kh, tl.program_id(2),
                  num_kv_heads, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_bt, page, group, head_dim, qk_scale, softcap, window, num_splits, stride_ob, stride_oh, k_ptr,
                  v_ptr, qw_ptr, kw_ptr, cs_ptr, slot_ptr, stride_nkb, stride_nkh, stride_nvb, stride_nvh, eps, ROPE,
                  HAS_NORM, HAS_SOFTCAP, False, BLOCK_G, BLOCK_KV, BLOCK_D, DOT_F32, PREFETCH, KV_POLICY)
    if arrive_last(count_ptr + b * num_kv_heads + kh, num_splits):
        for g in range(group):
            merge_head(o_ptr, lse_ptr, out_ptr, b, kh * group + g, num_kv_heads * group, num_splits, stride_ob,
                       stride_oh, head_dim, BLOCK_S, BLOCK_D)


def launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, rope=None):
    """The one-pass split kernel; the shipped kernels (decode_attention.launch) for one split or without
    counters. rope: as decode_attention.launch."""
    batch, hq, d = q.shape
    page, hk = k_cache.shape[1], k_cache.shape[2]
    splits = splits or attn.num_splits(batch, hk, block_tables.shape[1] * page, q.device)
    count = arrival.counters(q.device, batch * hk) if splits > 1 and batch else None
    if count is None:
        return decode.launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, rope)
    group = hq // hk
    block_d = max(16, triton.next_power_of_2(d))
    o = q.new_empty(batch, hq, splits, block_d, dtype=torch.float32)
    lse = q.new_empty(batch, hq, splits, dtype=torch.float32)
    out = q.new_empty(batch, hq, d)
    pdl = core.pdl(q, k_cache)
    k, v, q_norm_w, k_norm_w, eps, cos_sin, slots = rope or (q, q, None, None, 0.0, q, positions)
    wrap_triton(_split_merge_kernel)[(batch, hk, splits)](
        q, k_cache, v_cache, block_tables, positions, o, lse, out, count, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), page, group, d, scale, softcap, window, splits, out.stride(0),
        out.stride(1), k, v, q_norm_w, k_norm_w, cos_sin, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        eps, ROPE=rope is not None, HAS_NORM=q_norm_w is not None, HAS_SOFTCAP=softcap > 0,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_KV=attn.BLOCK_KV, BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(splits), DOT_F32=core.dot_f32(q), PDL=pdl,
        PREFETCH=core.prefetch(pdl, q_norm_w, k_norm_w), KV_POLICY=attn.kv_policy(batch),
        num_warps=decode.split_warps(batch), num_stages=2, **core.launch_opts(pdl))
    return out


@triton_op("nanovllm_experiments::decode_attention_onepass", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        positions: torch.Tensor, scale: float, window: int, softcap: float,
                        splits: int) -> torch.Tensor:
    """nanovllm_triton::decode_attention with the splits merged in the split kernel."""
    return launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits)


@triton_op("nanovllm_experiments::rope_decode_attention_onepass", mutates_args=("k_cache", "v_cache"))
def rope_decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_w: torch.Tensor | None,
                             k_norm_w: torch.Tensor | None, eps: float, positions: torch.Tensor, cos_sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             block_tables: torch.Tensor, scale: float, window: int, softcap: float,
                             splits: int) -> torch.Tensor:
    """nanovllm_triton::rope_decode_attention with the splits merged in the split kernel."""
    assert q.shape[-1] % 2 == 0 and q.stride(2) == k.stride(2) == v.stride(2) == 1, "head_dim must be even, contiguous"
    rope = (k, v, q_norm_w, k_norm_w, eps, cos_sin, slot_mapping)
    return launch(q, k_cache, v_cache, block_tables, positions, scale, window, softcap, splits, rope)


def attention_decode(q, k_cache, v_cache, meta, scale: float, window: int = 0, softcap: float = 0.0):
    """Split-KV paged decode attention, the splits merged by the last of them to finish (one launch)."""
    return torch.ops.nanovllm_experiments.decode_attention_onepass(
        q, k_cache, v_cache, meta.block_tables, meta.positions, float(scale), int(window), float(softcap), 0)


def rope_decode_attention(q, k, v, q_norm_w, k_norm_w, eps: float, positions, cos_sin, k_cache, v_cache, meta,
                          scale: float, window: int = 0, softcap: float = 0.0, *, parts):
    """q/k norm + RoPE + KV write inside the decode attention kernel, the splits merged in it too."""
    return torch.ops.nanovllm_experiments.rope_decode_attention_onepass(
        q, k, v, q_norm_w, k_norm_w, float(eps), positions, cos_sin, k_cache, v_cache, meta.slot_mapping,
        meta.block_tables, float(scale), int(window), float(softcap), 0)


# -- attn_out ---------------------------------------------------------------------------------------------
@triton.jit
def _gemv_add_rms_norm_kernel(x_ptr, w_ptr, ws_ptr, r_ptr, nw_ptr, out_ptr, res_ptr, count_ptr, M, N, K, stride_xm,
                              stride_wn, stride_rm, stride_om, stride_sm, eps, SPLIT_K: tl.constexpr,
                              EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                              PREFETCH: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (N blocks, SPLIT_K, M blocks): partial sums, then the last program to finish does every row."""
    acc, _, offs_m, offs_n, pid_k = program_tile(x_ptr, w_ptr, x_ptr, x_ptr, M, N, K, stride_xm, stride_wn, 0, eps,
                                                 False, False, SPLIT_K, EVEN_K, ONE_TILE, BLOCK_M, BLOCK_N, BLOCK_K,
                                                 DOT_F32, PDL, PREFETCH)
    store_partial(ws_ptr, acc, pid_k, offs_m, offs_n, M, N)
    if arrive_last(count_ptr, tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)):
        for m in range(M):
            add_rms_norm_row(ws_ptr, r_ptr, nw_ptr, out_ptr, res_ptr, m, M, N, stride_rm, stride_om, stride_sm, eps,
                             SPLIT_K, BLOCK)


@triton_op("nanovllm_experiments::gemv_add_rms_norm_onepass", mutates_args=())
def gemv_add_rms_norm(o: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """nanovllm_triton::gemv_add_rms_norm in one kernel; the caller checked that the counters exist."""
    o = o if o.stride(-1) == 1 else o.contiguous()
    (m, k), n = o.shape, w.shape[0]
    block = triton.next_power_of_2(n)
    count = arrival.counters(o.device, 1)

    def run(cfg, weight):
        ws = o.new_empty(cfg.SPLIT_K, m, n, dtype=torch.float32)
        out, res = o.new_empty(m, n), o.new_empty(m, n)
        pdl = core.pdl(o, residual)
        core.check_config(cfg, m)
        bm = core.tuning.block_m(m)
        wrap_triton(_gemv_add_rms_norm_kernel)[(triton.cdiv(n, cfg.BLOCK_N), cfg.SPLIT_K, triton.cdiv(m, bm))](
            o, weight, ws, residual, norm_w, out, res, count, m, n, k, o.stride(0), weight.stride(0),
            residual.stride(0), out.stride(0), res.stride(0), eps, SPLIT_K=cfg.SPLIT_K,
            EVEN_K=k % (cfg.SPLIT_K * cfg.BLOCK_K) == 0, ONE_TILE=core.one_tile(k, cfg), BLOCK_M=bm,
            DOT_F32=core.dot_f32(o), PDL=pdl, PREFETCH=core.prefetch(pdl, weight), BLOCK=block, **cfg.meta(),
            **core.launch_opts(pdl))
        return out, res

    return run(core.tuning.choose("attn_out_onepass", n, k, m, o, w, core.bencher(w, run)), w)


def attn_out(o, o_w, residual, norm_w, eps: float, *, parts):
    """O projection, residual add and RMSNorm in one kernel: the last program to finish does the rows."""
    if arrival.counters(o.device, 1) is None:
        return torch.ops.nanovllm_triton.gemv_add_rms_norm(o, o_w, residual, norm_w, eps)
    return torch.ops.nanovllm_experiments.gemv_add_rms_norm_onepass(o, o_w, residual, norm_w, eps)


register_impl("attention_decode", BACKEND, devices=core.devices(), dtypes=core.DTYPES,
              check=attn.check_attention)(attention_decode)
core.register_site("rope_decode_attention", rope_decode_attention, check=attn.check_rope_attention, gemv_rows=False,
                   backend=BACKEND)
core.register_site("attn_out", attn_out, check=attn_out_site.check_attn_out, backend=BACKEND)
