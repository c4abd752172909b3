"""Backend `triton_persistent` of site `decode_layer` (experimental, preset `persistent_layer`: full layer
fusion): a whole decoder layer's batch-1 decode step in one persistent kernel.

One program per SM walks the layer's phases, with a grid-wide barrier (an arrival counter) wherever a phase
needs what every program wrote in the phase before:
  A. RMSNorm + QKV GEMV, each program a contiguous range of rows           -> qkv (scratch)
  B. q/k norm + RoPE + KV write + split-KV attention, one (kv head, split) per program, the splits merged by
     the last to arrive                                                     -> attention output
  C. O projection + residual add                                            -> x1, the new residual
  D. RMSNorm of x1 (every program redoes it: hidden * 2 bytes) + gate/up GEMV over interleaved rows + SiLU*up
  E. down GEMV + residual                                                   -> the layer's output
Each GEMV phase issues its weight tile *before* it waits at the barrier, so the phase's weights stream in
while the slowest program finishes the phase before. The barrier needs every program resident at once: the
grid is PER_SM programs per SM, and that many always fit one. Under the Triton interpreter programs run one
after another, so there each phase is a launch of its own (BARRIER=False). Steps of more than one row run the
composition of the layer's sites.
It lost against all_fused's five-launch chain (benchmarks/RESULTS.md, "what we tried that lost"): a grid
barrier costs about what a PDL kernel boundary costs, and one program per SM streams the GEMV phases slower
than the tuned site kernels with several programs per SM.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import get_op
from nanovllm.ops.plugins import load_builtin, load_sibling

core = load_builtin("triton/_gemv_core")
attn = load_builtin("triton/_decode_core")
arrival = load_sibling(__file__, "_arrival")
gdc_launch_dependents, gdc_wait, arrive_last = core.gdc_launch_dependents, core.gdc_wait, arrival.arrive_last
split_program, merge_head, silu_mul_pairs = attn.split_program, attn.merge_head, core.silu_mul_pairs
BACKEND = "triton_persistent"
# Tunables (read at each call): weight elements a program loads per step (double-buffered; 0: a program's whole
# tile at once), warps per program, the attention's split count ("capacity": as the decode attention kernel
# picks it; "max": as many as the programs allow). Issuing each tile one barrier sooner (two tiles live) was
# slower, from the register pressure.
CHUNK = int(os.environ.get("NANOVLLM_LAYER_CHUNK", "0"))
NUM_WARPS = int(os.environ.get("NANOVLLM_LAYER_WARPS", "8"))
# programs per SM: 2 only with 4 warps or fewer, so that two programs always fit an SM's registers (2 x 128
# threads x 255) and every program is resident, as the barrier needs
PER_SM = int(os.environ.get("NANOVLLM_LAYER_PER_SM", "1"))
SPLITS = os.environ.get("NANOVLLM_LAYER_SPLITS", "capacity")


@triton.jit
def load_acquire(ptr):
    """ld.acquire.gpu: a plain load (no atomic traffic at the counter while programs poll) that orders the
    loads after it."""
    return tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def grid_barrier(bar_ptr, target, POLL_ATOMIC: tl.constexpr):
    """Arrive at the counter, then wait until it reaches `target`: every program's stores before its arrival
    are visible after the wait (read them .cg: L1 is not coherent across SMs)."""
    tl.debug_barrier()  # all of this program's stores are issued before its arrival (release is cumulative)
    seen = tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu") + 1
    while seen < target:
        if POLL_ATOMIC:
            seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        else:
            seen = tl.max(load_acquire(bar_ptr + tl.zeros((1,), tl.int32)), axis=0)
    tl.debug_barrier()


@triton.jit
def program_rows(pid, n, ROWS: tl.constexpr):
    """(first row, row count) of program pid's contiguous share of n rows, ROWS each (the last ones fewer)."""
    row0 = pid * ROWS
    return row0, tl.minimum(tl.maximum(n - row0, 0), ROWS)


@triton.jit
def first_tile(w_ptr, row0, rows, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The first (BLOCK_N, BLOCK_K) tile of rows row0 .. row0 + rows of a contiguous (N, K) weight: issued
    ahead of the wait for the activations, it streams in meanwhile."""
    offs_n, offs_k = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    ptrs = w_ptr + (row0 + offs_n)[:, None].to(tl.int64) * K + offs_k[None, :]
    return tl.load(ptrs, mask=(offs_n < rows)[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def rows_gemv(w, w_ptr, row0, rows, K, x_ptr, nw_ptr, eps, HAS_NORM: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_X: tl.constexpr):
    """fp32 (BLOCK_N,) w[row0 : row0 + rows] @ x, from the rows' first tile `w` on; x = rms_norm(x, nw) when
    HAS_NORM (rounded as the native). x is another program's output: loaded past L1 (.cg)."""
    offs_n, offs_k = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    mask_n = offs_n < rows
    w_ptrs = w_ptr + (row0 + offs_n)[:, None].to(tl.int64) * K + offs_k[None, :]
    if HAS_NORM:
        offs_x = tl.arange(0, BLOCK_X)
        xs = tl.load(x_ptr + offs_x, mask=offs_x < K, other=0.0, cache_modifier=".cg").to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xs * xs, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = (k + offs_k) < K
        x = tl.load(x_ptr + k + offs_k, mask=mask_k, other=0.0, cache_modifier=".cg")
        if HAS_NORM:
            nw = tl.load(nw_ptr + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = (nw * (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)).to(x.dtype)
        w_next = tl.load(w_ptrs + k + BLOCK_K, mask=mask_n[:, None] & ((k + BLOCK_K + offs_k) < K)[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        w = w_next
    return acc


@triton.jit
def phase_gemv(w_ptr, row0, rows, K, x_ptr, nw_ptr, eps, bar_ptr, target, HAS_NORM: tl.constexpr,
               BARRIER: tl.constexpr, POLL_ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_X: tl.constexpr):
    """A GEMV phase: the weight tile in flight, then (BARRIER) the wait for the phase before, then rows_gemv."""
    w = first_tile(w_ptr, row0, rows, K, BLOCK_N, BLOCK_K)
    if BARRIER:
        grid_barrier(bar_ptr, target, POLL_ATOMIC)
    return rows_gemv(w, w_ptr, row0, rows, K, x_ptr, nw_ptr, eps, HAS_NORM, BLOCK_N, BLOCK_K, BLOCK_X)


@triton.jit
def store_rows(y_ptr, acc, row0, rows, b_ptr, r_ptr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """y[row0 + i] = round(round(acc + bias) + residual), the roundings of F.linear then `residual + y`."""
    offs = tl.arange(0, BLOCK_N)
    mask = offs < rows
    if HAS_BIAS:
        acc += tl.load(b_ptr + row0 + offs, mask=mask, other=0.0).to(tl.float32)
    y = acc.to(y_ptr.dtype.element_ty)
    if HAS_RES:
        r = tl.load(r_ptr + row0 + offs, mask=mask, other=0.0, cache_modifier=".cg")
        y = (y.to(tl.float32) + r.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row0 + offs, y, mask=mask)


@triton.jit
def _decode_layer_kernel(
        x_ptr, out_ptr, in_norm_ptr, qkv_w_ptr, qkv_b_ptr, q_norm_ptr, k_norm_ptr, o_w_ptr, post_norm_ptr, gate_up_ptr,
        down_ptr, qkv_ptr, part_ptr, lse_ptr, attn_ptr, x1_ptr, act_ptr, count_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr,
        slot_ptr, cs_ptr, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, page, eps, qk_scale,
        softcap, window, num_splits,
        HIDDEN: tl.constexpr, Q_DIM: tl.constexpr, KV_DIM: tl.constexpr, INTER: tl.constexpr, HEAD_DIM: tl.constexpr,
        KV_HEADS: tl.constexpr, ROWS_QKV: tl.constexpr, ROWS_O: tl.constexpr, ROWS_GU: tl.constexpr,
        ROWS_DOWN: tl.constexpr, BN_QKV: tl.constexpr, BK_QKV: tl.constexpr, BN_O: tl.constexpr, BK_O: tl.constexpr,
        BN_GU: tl.constexpr, BK_GU: tl.constexpr, BN_DOWN: tl.constexpr, BK_DOWN: tl.constexpr,
        BLOCK_H: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, BARRIER: tl.constexpr,
        POLL_ATOMIC: tl.constexpr, PDL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QK_NORM: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DIRECT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_KV: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr, KV_POLICY: tl.constexpr):
    """Grid (programs,): phases FIRST..LAST (0..4 = A..E) of the layer; BARRIER: a grid barrier between them.
    Counters: [0] the barrier, [1] the programs done (the last resets [0]), [2:] the attention merges."""
    pid, progs = tl.program_id(0), tl.num_programs(0)
    n_qkv: tl.constexpr = Q_DIM + 2 * KV_DIM
    run_a: tl.constexpr = FIRST <= 0
    run_b: tl.constexpr = (FIRST <= 1) & (1 <= LAST)
    run_c: tl.constexpr = (FIRST <= 2) & (2 <= LAST)
    run_d: tl.constexpr = (FIRST <= 3) & (3 <= LAST)
    run_e: tl.constexpr = LAST >= 4
    if PDL:
        gdc_launch_dependents()
    row_a, n_a = program_rows(pid, n_qkv, ROWS_QKV)
    row_c, n_c = program_rows(pid, HIDDEN, ROWS_O)
    row_d, n_d = program_rows(pid, 2 * INTER, ROWS_GU)
    row_e, n_e = program_rows(pid, HIDDEN, ROWS_DOWN)
    # A: RMSNorm + QKV
    if run_a:
        w_a = first_tile(qkv_w_ptr, row_a, n_a, HIDDEN, BN_QKV, BK_QKV)
    if PDL:
        gdc_wait()
    if run_a:
        acc = rows_gemv(w_a, qkv_w_ptr, row_a, n_a, HIDDEN, x_ptr, in_norm_ptr, eps, True, BN_QKV, BK_QKV, BLOCK_H)
        store_rows(qkv_ptr, acc, row_a, n_a, qkv_b_ptr, qkv_b_ptr, HAS_BIAS, False, BN_QKV)
    # B: q/k norm + RoPE + KV write + attention
    if run_b:
        if BARRIER:
            grid_barrier(count_ptr, progs, POLL_ATOMIC)
        if pid < KV_HEADS * num_splits:
            kh, group = pid // num_splits, Q_DIM // KV_DIM
            split_program(qkv_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, part_ptr, lse_ptr, attn_ptr, 0, kh,
                          pid % num_splits, KV_HEADS, n_qkv, HEAD_DIM, stride_kb, stride_ks, stride_kh, stride_vb,
                          stride_vs, stride_vh, 0, page, group, HEAD_DIM, qk_scale, softcap, window, num_splits,
                          Q_DIM, HEAD_DIM, qkv_ptr + Q_DIM, qkv_ptr + Q_DIM + KV_DIM, q_norm_ptr, k_norm_ptr, cs_ptr,
                          slot_ptr, n_qkv, HEAD_DIM, n_qkv, HEAD_DIM, eps, True, HAS_QK_NORM, HAS_SOFTCAP, DIRECT,
                          BLOCK_G, BLOCK_KV, BLOCK_D, DOT_F32, False,
                          KV_POLICY)  # PREFETCH off: the grid barrier above is this phase's wait
            if not DIRECT:  # the last split of a kv head to finish merges the group's query heads
                if arrive_last(count_ptr + 2 + kh, num_splits):
                    for g in range(group):
                        merge_head(part_ptr, lse_ptr, attn_ptr, 0, kh * group + g, KV_HEADS * group, num_splits,
                                   Q_DIM, HEAD_DIM, HEAD_DIM, BLOCK_S, BLOCK_D)
    # C: O projection + residual
    if run_c:
        acc = phase_gemv(o_w_ptr, row_c, n_c, Q_DIM, attn_ptr, attn_ptr, eps, count_ptr, 2 * progs, False, BARRIER,
                         POLL_ATOMIC, BN_O, BK_O, BLOCK_H)
        store_rows(x1_ptr, acc, row_c, n_c, x_ptr, x_ptr, False, True, BN_O)
    # D: RMSNorm + gate/up + SiLU * up
    if run_d:
        acc = phase_gemv(gate_up_ptr, row_d, n_d, HIDDEN, x1_ptr, post_norm_ptr, eps, count_ptr, 3 * progs, True,
                         BARRIER, POLL_ATOMIC, BN_GU, BK_GU, BLOCK_H)
        act = tl.reshape(silu_mul_pairs(acc[None, :], act_ptr, 1, BN_GU), (BN_GU // 2,))
        offs_i = tl.arange(0, BN_GU // 2)
        tl.store(act_ptr + row_d // 2 + offs_i, act.to(act_ptr.dtype.element_ty), mask=offs_i < n_d // 2)
    # E: down + residual
    if run_e:
        acc = phase_gemv(down_ptr, row_e, n_e, INTER, act_ptr, act_ptr, eps, count_ptr, 4 * progs, False, BARRIER,
                         POLL_ATOMIC, BN_DOWN, BK_DOWN, BLOCK_H)
        store_rows(out_ptr, acc, row_e, n_e, x1_ptr, x1_ptr, False, True, BN_DOWN)
    if BARRIER:
        if arrive_last(count_ptr + 1, progs):  # every program is past its last wait: rearm the barrier
            tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")


def tile(rows: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a program's `rows` rows of K columns: CHUNK weight elements per step."""
    bn, bk = triton.next_power_of_2(max(rows, 1)), triton.next_power_of_2(k)
    return bn, min(bk, max(16, CHUNK // bn)) if CHUNK else bk


@triton_op("nanovllm_experiments::persistent_decode_layer", mutates_args=("k_cache", "v_cache"))
def decode_layer_op(x: torch.Tensor, input_norm: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
                    q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, o_w: torch.Tensor,
                    post_norm: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor, eps: float,
                    positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, block_tables: torch.Tensor, counters: torch.Tensor, scale: float,
                    window: int, softcap: float, poll_atomic: bool = False, barrier: bool = True,
                    only_phase: int = -1) -> torch.Tensor:
    """One row's decoder layer (x: (1, hidden), the residual stream) -> the next residual stream; gate_up_w's
    rows interleaved (gate_0, up_0, ...). barrier=False: one launch per phase (the interpreter's way);
    only_phase >= 0: that phase alone (for timing it)."""
    hidden, (page, kv_heads, head_dim) = x.shape[1], k_cache.shape[1:]
    kv, inter = kv_heads * head_dim, down_w.shape[1]
    q_dim = qkv_w.shape[0] - 2 * kv
    if PER_SM > 1 and PER_SM * NUM_WARPS > 8:
        raise ValueError(f"{PER_SM} programs of {NUM_WARPS} warps per SM may not all be resident")
    progs = PER_SM * core.tuning.num_sms(x.device)
    splits = min(64, progs // kv_heads)
    if SPLITS == "capacity":
        splits = min(splits, attn.num_splits(1, kv_heads, block_tables.shape[1] * page, x.device))
    rows = dict(QKV=triton.cdiv(q_dim + 2 * kv, progs), O=triton.cdiv(hidden, progs),
                GU=2 * triton.cdiv(inter, progs), DOWN=triton.cdiv(hidden, progs))
    ks = dict(QKV=hidden, O=q_dim, GU=hidden, DOWN=inter)
    meta = {f"ROWS_{n}": r for n, r in rows.items()}
    for n, r in rows.items():
        meta[f"BN_{n}"], meta[f"BK_{n}"] = tile(r, ks[n])
    block_d = max(16, triton.next_power_of_2(head_dim))
    qkv = x.new_empty(q_dim + 2 * kv)
    part = x.new_empty(q_dim // head_dim, splits, block_d, dtype=torch.float32)
    lse = x.new_empty(q_dim // head_dim, splits, dtype=torch.float32)
    attn_out, x1, act, out = x.new_empty(1, q_dim), x.new_empty(1, hidden), x.new_empty(1, inter), torch.empty_like(x)
    barrier = barrier and only_phase < 0
    use_pdl = barrier and core.pdl(x, qkv_w)
    phases = [(0, 4)] if barrier else [(p, p) for p in range(5) if only_phase in (-1, p)]
    for first, last in phases:
        wrap_triton(_decode_layer_kernel)[(progs,)](
            x, out, input_norm, qkv_w, qkv_b, q_norm_w, k_norm_w, o_w, post_norm, gate_up_w, down_w, qkv, part, lse,
            attn_out, x1, act, counters, k_cache, v_cache, block_tables, positions, slot_mapping, cos_sin,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), page, eps, scale, softcap, window, splits, HIDDEN=hidden, Q_DIM=q_dim, KV_DIM=kv,
            INTER=inter, HEAD_DIM=head_dim, KV_HEADS=kv_heads, BLOCK_H=triton.next_power_of_2(hidden), FIRST=first,
            LAST=last, BARRIER=barrier, POLL_ATOMIC=poll_atomic, PDL=use_pdl, HAS_BIAS=qkv_b is not None,
            HAS_QK_NORM=q_norm_w is not None, HAS_SOFTCAP=softcap > 0, DIRECT=splits == 1,
            BLOCK_G=max(16, triton.next_power_of_2(q_dim // kv)), BLOCK_KV=attn.BLOCK_KV, BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(splits), DOT_F32=core.dot_f32(x), KV_POLICY=attn.kv_policy(1),
            num_warps=NUM_WARPS, num_stages=1, **meta, **core.launch_opts(use_pdl))
    return out


def decode_layer(x, weights, settings, positions, cos_sin, k_cache, v_cache, meta, *, parts):
    """The whole layer in one persistent kernel for one row; more rows run the layer's sites (parts). weights:
    a LayerWeights, settings: an AttentionSettings (nanovllm/ops/sites.py)."""
    counters = arrival.counters(x.device, 2 + k_cache.shape[2]) if x.shape[0] == 1 else None
    if counters is None:  # more than one row, or no counters here (torch.compile tracing, capture before use)
        return get_op("decode_layer").native(x, weights, settings, positions, cos_sin, k_cache, v_cache, meta, **parts)
    w, s = weights, settings
    return torch.ops.nanovllm_experiments.persistent_decode_layer(
        x, w.input_norm, w.qkv_w, w.qkv_b, w.q_norm_w, w.k_norm_w, w.o_w, w.post_norm, w.gate_up_w, w.down_w,
        float(s.eps), positions, cos_sin, k_cache, v_cache, meta.slot_mapping, meta.block_tables, counters,
        float(s.scale), int(s.window), float(s.softcap), barrier=not core.tuning.INTERPRET)


def _check(shapes: dict) -> str | None:
    """head_dim even and <= 256, heads a multiple of kv_heads, hidden <= 8192"""
    hidden = shapes.get("hidden", 1)
    return attn.check_rope_attention(shapes) or (f"hidden size {hidden} > 8192" if hidden > 8192 else None)


core.register_site("decode_layer", decode_layer, check=_check, gemv_rows=False, backend=BACKEND,
                   layouts={"gate_up_w": core.interleave_gate_up})
