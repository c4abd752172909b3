"""Shared GEMV machinery for the Triton plugins: the weight-streaming tile loop, the general GEMV kernel
(optional RMSNorm prologue, bias and residual epilogues, split-K), and registration helpers.

Weights stay in Hugging Face's (out, in) row-major layout: each program streams BLOCK_N contiguous rows
over its K range, which is the coalesced order for a GEMV. One row of x (batch 1) runs elementwise FMAs;
2..16 rows run tl.dot with 16-row tiles. More rows than that are a GEMM and go to cuBLAS (the callers).
On Hopper every kernel launches with PDL (programmatic dependent launch): it lets the next kernel start
while it drains, and a GEMV issues its first weight tile before waiting for the kernel before it, so
the launch gap and the DRAM latency hide behind the previous kernel (see `pdl` and `prefetch`).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import get_op, native_site, register_impl
from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.workspace import workspace

tuning = load_sibling(__file__, "_tuning")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The GEMVs read each weight once a step, and a step's weights (1.2 GB for Qwen3-0.6B) pass through L2 many
# times over: streamed "evict_first", they leave L2 to what is read again (the short caches, norms, activations)
WEIGHTS_POLICY: tl.constexpr = tl.constexpr("evict_first")

try:  # programmatic dependent launch (Hopper+); the intrinsics are no-ops in a kernel launched without it
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except ImportError:  # an older Triton: PDL stays off
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


# one line: torch.compile copies kernel sources into generated modules, where a "\n" escape breaks the string
LAUNCH_AFTER_ASM: tl.constexpr = tl.constexpr("griddepcontrol.launch_dependents; mov.b32 $0, $1;")


@triton.jit
def launch_dependents_after(w):
    """w unchanged, and griddepcontrol.launch_dependents once it is in registers: the asm reads w, so it waits
    for the loads' data, not just their issue."""
    pack: tl.constexpr = 2 if w.dtype.primitive_bitwidth == 16 else 1  # a 32-bit register holds two 16-bit values
    return tl.inline_asm_elementwise(LAUNCH_AFTER_ASM, "=r,r", [w], dtype=w.dtype, is_pure=False, pack=pack)


def pdl(*tensors: torch.Tensor) -> bool:
    """Launch with PDL: the next kernel's programs start (and prefetch weights) while this one drains, and
    wait (gdc_wait) before reading activations or storing anything. CUDA sm90+, eager or CUDA-graph
    launches only (not while torch.compile traces), NANOVLLM_TRITON_PDL=0 turns it off."""
    t = tensors[0]
    if tuning.INTERPRET or t.device.type != "cuda" or not HAS_GDC or os.environ.get("NANOVLLM_TRITON_PDL") == "0":
        return False
    if torch.compiler.is_compiling() or any(type(x) not in (torch.Tensor, torch.nn.Parameter) for x in tensors):
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def prefetch(use_pdl: bool, *weights: torch.Tensor | None) -> bool:
    """Load the first weight tile (and a one-tile program's norm weights; the decode attention's q/k norm
    weights) before waiting on the previous kernel: only for Parameters, which no kernel in flight writes (a
    plain tensor may be the output of the very kernel we overlap with)."""
    return use_pdl and all(isinstance(w, torch.nn.Parameter) for w in weights if w is not None)


def launch_opts(use_pdl: bool) -> dict:
    return {"launch_pdl": True} if use_pdl else {}


@triton.jit
def dot_acc(acc, x, w, DOT_F32: tl.constexpr):
    """acc += x @ w.T on tensor cores; fp32 operands in IEEE mode, so fp32 models stay exact (the
    interpreter also needs fp32 operands: its dot of bf16 is wrong)."""
    if DOT_F32:
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
    return acc


@triton.jit
def load_rows(r_ptr, stride_rm, offs_m, offs_n, M, N):
    """fp32 (BLOCK_M, BLOCK_N) tile of a row-major (M, N) activation (a residual), zeros outside."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    return tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_weight_tile(w_ptrs, k, k_hi, offs_k, mask_n):
    """The (BLOCK_N, BLOCK_K) weight tile at column k, zeros past k_hi or outside the rows."""
    mask = mask_n[:, None] & ((k + offs_k) < k_hi)[None, :]
    return tl.load(w_ptrs + k, mask=mask, other=0.0, eviction_policy=WEIGHTS_POLICY)


@triton.jit
def gemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, nw_ptr, r_ptr, stride_rm, M, N, K, k_lo, k_hi, eps, pid_m, pid_n,
              HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
              PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """(x[rows] @ w[cols, k_lo:k_hi].T, the residual's tile): fp32 (BLOCK_M, BLOCK_N) each, the residual zeros
    without HAS_RES.

    HAS_NORM applies RMSNorm to x on the fly: x * norm_w per column, and 1/rms per row at the end (the
    row scale factors out of the dot product, so one pass over x gives both; needs k_lo=0, k_hi=K).
    PDL: waits for the previous kernel (programmatic dependent launch) before touching activations, and lets
    the next kernel launch (the caller does not): at once, or with one row, PREFETCH and ONE_TILE only once the
    weight tile is in registers. Launched at once, the kernels after it start prefetching too and share DRAM
    with this one's tile, which the critical path needs first. PREFETCH (weights that no kernel in flight
    writes) issues the first weight tile before the wait, and with ONE_TILE the norm weights too: a per-layer
    weight is a DRAM miss, which after the wait queues behind the weight prefetch of the kernels already launched.
    One row: ONE_TILE (k_hi - k_lo <= BLOCK_K) loads the weights once and reduces them at once, holding
    nothing but the tile, so more programs stay resident and prefetch during the kernel before; otherwise
    the weight tiles are double-buffered (the next tile's loads in flight during the FMAs) into a
    (BLOCK_N, BLOCK_K) accumulator. More rows (tl.dot) leave the pipelining of the operands to Triton, except
    with PREFETCH: the first weight tile is loaded before the wait, and each next one a step ahead of its dot.
    HAS_RES loads the residual (the epilogue's) right after the wait, with x: loaded after the reduction it
    would be a second round trip after the wait (a cross-warp reduction's barriers keep ptxas from hoisting
    it), on the critical path of the decode chain."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    r = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # int64: big vocab x hidden
    if BLOCK_M == 1:
        late = PREFETCH and ONE_TILE  # let the next kernel launch once this tile is in (see PDL)
        if PDL and not late:
            gdc_launch_dependents()
        if PDL and not PREFETCH:
            gdc_wait()
        mask_k = (k_lo + offs_k) < k_hi  # the first (with ONE_TILE the only) tile's columns
        w = load_weight_tile(w_ptrs, k_lo, k_hi, offs_k, mask_n)
        if PDL and late:
            w = launch_dependents_after(w)
        if ONE_TILE and HAS_NORM:  # a per-layer weight: a DRAM miss, best issued before the wait too
            nw = tl.load(nw_ptr + k_lo + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        if PDL and PREFETCH:
            gdc_wait()
        if HAS_RES:
            r = load_rows(r_ptr, stride_rm, offs_m, offs_n, M, N)
        if ONE_TILE:
            x = tl.load(x_ptr + pid_m * stride_xm + k_lo + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            ss = x * x
            if HAS_NORM:
                x = x * nw
            out = tl.sum(w.to(tl.float32) * x[None, :], axis=1)[None, :]
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            ss = tl.zeros((BLOCK_K,), tl.float32)
            for k in range(k_lo, k_hi, BLOCK_K):
                mask_k = (k + offs_k) < k_hi
                x = tl.load(x_ptr + pid_m * stride_xm + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                if HAS_NORM:
                    nw = tl.load(nw_ptr + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                    ss += x * x
                    x = x * nw
                w_next = load_weight_tile(w_ptrs, k + BLOCK_K, k_hi, offs_k, mask_n)  # all masked on the last step
                acc += w.to(tl.float32) * x[None, :]
                w = w_next
            out = tl.sum(acc, axis=1)[None, :]
        if HAS_NORM:
            out = out * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    else:
        if PDL:
            gdc_launch_dependents()
        if PREFETCH:  # the first weight tile before the wait; then each tile's loads go out one step ahead
            w = load_weight_tile(w_ptrs, k_lo, k_hi, offs_k, mask_n)
        if PDL:
            gdc_wait()
        if HAS_RES:
            r = load_rows(r_ptr, stride_rm, offs_m, offs_n, M, N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        ss = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            mask_k = (k + offs_k) < k_hi
            x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if HAS_NORM:
                nw = tl.load(nw_ptr + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                xf = x.to(tl.float32)
                ss += xf * xf
                x = (xf * nw[None, :]).to(x.dtype)
            if PREFETCH:
                w_next = load_weight_tile(w_ptrs, k + BLOCK_K, k_hi, offs_k, mask_n)  # all masked on the last step
                acc = dot_acc(acc, x, w, DOT_F32)
                w = w_next
            else:
                if EVEN_K:
                    w = tl.load(w_ptrs + k, mask=mask_n[:, None], other=0.0, eviction_policy=WEIGHTS_POLICY)
                else:
                    w = load_weight_tile(w_ptrs, k, k_hi, offs_k, mask_n)
                acc = dot_acc(acc, x, w, DOT_F32)
        out = acc
        if HAS_NORM:
            out = out * tl.rsqrt(tl.sum(ss, axis=1) / K + eps)[:, None]
    return out, r


def one_tile(k: int, cfg) -> bool:
    """Whether each program's K range fits one BLOCK_K tile (gemv_tile's ONE_TILE)."""
    return k <= cfg.SPLIT_K * cfg.BLOCK_K


def interleave_gate_up(w: torch.Tensor) -> torch.Tensor:
    """(2I, H) [gate; up] -> rows gate_0, up_0, gate_1, up_1, ... (the layout of the fused MLP kernels)"""
    inter = w.shape[0] // 2
    return w.view(2, inter, -1).transpose(0, 1).reshape(w.shape).contiguous()


@triton.jit
def silu_mul_pairs(acc, a_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N // 2) fp32 silu(gate) * up of an fp32 (BLOCK_M, BLOCK_N) GEMV tile over interleaved
    gate/up rows, rounded to a_ptr's dtype where the native rounds (the linear's output, F.silu)."""
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # even rows gate, odd rows up
    dtype = a_ptr.dtype.element_ty
    gate, up = gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32)
    return (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up


@triton.jit
def store_silu_mul(acc, a_ptr, stride_am, pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store silu(gate) * up (silu_mul_pairs) of program (pid_m, pid_n)'s fp32 GEMV tile over N interleaved
    gate/up rows as its (BLOCK_M, BLOCK_N // 2) block of the (M, N // 2) activation at a_ptr."""
    act = silu_mul_pairs(acc, a_ptr, BLOCK_M, BLOCK_N)
    dtype = a_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    mask = (offs_m[:, None] < M) & (offs_i[None, :] < N // 2)
    tl.store(a_ptr + offs_m[:, None] * stride_am + offs_i[None, :], act.to(dtype), mask=mask)


@triton.jit
def store_out(acc, y_ptr, stride_ym, b_ptr, r, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """y = round(acc + bias), then round(y + r) (r: the residual's fp32 tile, from load_rows): the roundings of
    F.linear followed by `residual + y`."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    if HAS_RES:
        y = (y.to(tl.float32) + r).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask)


@triton.jit
def program_tile(x_ptr, w_ptr, nw_ptr, r_ptr, M, N, K, stride_xm, stride_wn, stride_rm, eps, HAS_NORM: tl.constexpr,
                 HAS_RES: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                 PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """This program's (rows, columns, K range) of a grid (N blocks, SPLIT_K, M blocks) GEMV: (acc, residual
    tile, offs_m, offs_n, pid_k)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * span
    k_hi = tl.minimum(K, k_lo + span)
    acc, r = gemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, nw_ptr, r_ptr, stride_rm, M, N, K, k_lo, k_hi, eps, pid_m,
                       pid_n, HAS_NORM, HAS_RES, EVEN_K, ONE_TILE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PDL, PREFETCH)
    return acc, r, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_k


@triton.jit
def store_partial(ws_ptr, acc, pid_k, offs_m, offs_n, M, N):
    """fp32 partial sums into the (SPLIT_K, M, N) workspace."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def reduce_if_last(ws_ptr, cnt_ptr, acc, y_ptr, stride_ym, b_ptr, r_ptr, stride_rm, pid_k, offs_m, offs_n, M, N,
                   SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """Split-K in one launch (Config.SERIAL): each program stores its fp32 partial and counts itself in at its
    tile's counter; the last of the tile's SPLIT_K programs to arrive sums the partials in a fixed order (the sum
    kernel's: the same bits, whatever the arrival order), applies the epilogue and resets the counter to 0 for the
    next launch. It saves the sum kernel's launch and costs every program an atomic at its end."""
    store_partial(ws_ptr, acc, pid_k, offs_m, offs_n, M, N)
    tl.debug_barrier()  # every thread's share of the partial is stored before the counter says so
    tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        tl.debug_barrier()
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        total = tl.zeros_like(acc)
        for s in tl.static_range(SPLIT_K):  # past L1: the other programs' partials were written elsewhere
            total += tl.load(ws_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask, other=0.0,
                             cache_modifier=".cg")
        r = load_rows(r_ptr, stride_rm, offs_m, offs_n, M, N) if HAS_RES else total  # unread without HAS_RES
        store_out(total, y_ptr, stride_ym, b_ptr, r, offs_m, offs_n, M, N, HAS_BIAS, HAS_RES)
        tl.store(cnt_ptr + tile, 0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, b_ptr, r_ptr, nw_ptr, M, N, K, stride_xm, stride_wn,
                 stride_ym, stride_rm, eps, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr,
                 PARTIAL: tl.constexpr, SERIAL: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                 ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_F32: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """Grid (N blocks, SPLIT_K, M blocks). PARTIAL: y is an fp32 (SPLIT_K, M, N) workspace of partial sums, which
    a kernel after it reduces. SERIAL: the tile's last program reduces the partials in ws (reduce_if_last,
    counters at cnt)."""
    # split-K partials leave the residual to the reduction
    acc, r, offs_m, offs_n, pid_k = program_tile(x_ptr, w_ptr, nw_ptr, r_ptr, M, N, K, stride_xm, stride_wn,
                                                 stride_rm, eps, HAS_NORM, HAS_RES and not (PARTIAL or SERIAL),
                                                 SPLIT_K, EVEN_K, ONE_TILE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PDL,
                                                 PREFETCH)
    if PARTIAL:
        store_partial(y_ptr, acc, pid_k, offs_m, offs_n, M, N)
    elif SERIAL:
        reduce_if_last(ws_ptr, cnt_ptr, acc, y_ptr, stride_ym, b_ptr, r_ptr, stride_rm, pid_k, offs_m, offs_n, M, N,
                       SPLIT_K, HAS_BIAS, HAS_RES)
    else:
        store_out(acc, y_ptr, stride_ym, b_ptr, r, offs_m, offs_n, M, N, HAS_BIAS, HAS_RES)


@triton.jit
def _splitk_sum_kernel(ws_ptr, y_ptr, b_ptr, r_ptr, M, N, stride_ym, stride_rm, SPLIT_K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (M, N blocks): sum the split-K partials (fixed order, deterministic), then the epilogue."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs_m = tl.program_id(0) + tl.arange(0, 1)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_n[None, :] < N
    acc = tl.zeros((1, BLOCK), tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask, other=0.0)
    r = load_rows(r_ptr, stride_rm, offs_m, offs_n, M, N) if HAS_RES else acc  # acc: unread without HAS_RES
    store_out(acc, y_ptr, stride_ym, b_ptr, r, offs_m, offs_n, M, N, HAS_BIAS, HAS_RES)


def launch_split_sum(ws, out, bias, residual, use_pdl: bool) -> None:
    """The sum kernel of a split-K GEMV that wrote its partials into ws (SPLIT_K, M, N)."""
    sk, m, n = ws.shape
    block = min(1024, triton.next_power_of_2(n))
    wrap_triton(_splitk_sum_kernel)[(m, triton.cdiv(n, block))](
        ws, out, bias, residual, m, n, out.stride(0), residual.stride(0) if residual is not None else 0,
        SPLIT_K=sk, HAS_BIAS=bias is not None, HAS_RES=residual is not None, BLOCK=block, PDL=use_pdl, num_warps=4,
        **launch_opts(use_pdl))


@triton.jit
def keep_block_max(logits, pid_n, N, best, best_idx, BLOCK_N: tl.constexpr):
    """The running (max, first index of the max) per row, `best` and `best_idx`, updated with vocab block pid_n's
    float32 (BLOCK_M, BLOCK_N) logits: columns at or past N never win, and a tie keeps the earlier block's index."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    logits = tl.where(offs_n[None, :] < N, logits, float("-inf"))
    v = tl.max(logits, axis=1)
    i = tl.argmax(logits, axis=1) + pid_n * BLOCK_N  # first index of the max within the block
    take = v > best  # strict: an earlier block keeps a tie
    return tl.where(take, v, best), tl.where(take, i, best_idx)


@triton.jit
def argmax_reduce_kernel(val_ptr, idx_ptr, out_ptr, num_progs, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (M,): the max of each row's per-program winners (value, token id), the smallest token id among
    equal maxima (torch.argmax's rule). Shared by the argmax LM head and the sampler."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_progs
    v = tl.load(val_ptr + m * num_progs + offs, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + m * num_progs + offs, mask=mask, other=2**31 - 1)
    top = tl.max(v, axis=0)
    tl.store(out_ptr + m, tl.min(tl.where(v == top, i, 2**31 - 1), axis=0).to(tl.int64))


def reduce_winners(val: torch.Tensor, idx: torch.Tensor, use_pdl: bool) -> torch.Tensor:
    """(M,) int64 token ids from the (M, programs) per-program winners, through argmax_reduce_kernel."""
    m, progs = val.shape
    out = val.new_empty(m, dtype=torch.int64)
    block = triton.next_power_of_2(progs)
    wrap_triton(argmax_reduce_kernel)[(m,)](val, idx, out, progs, BLOCK=block, PDL=use_pdl,
                                            num_warps=max(1, min(16, block // 256)), **launch_opts(use_pdl))
    return out


def dot_f32(x: torch.Tensor) -> bool:
    return tuning.INTERPRET or x.dtype == torch.float32


def check_config(cfg, m: int) -> None:
    if tuning.block_m(m) > 1 and min(cfg.BLOCK_N, cfg.BLOCK_K) < 16:
        raise ValueError(f"{cfg}: the tl.dot path ({m} rows) needs BLOCK_N and BLOCK_K >= 16")


MAX_TILES = 1 << 16  # split-K counters per device: (N blocks) x (M blocks) of the widest split GEMV
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_counters(like: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The device's split-K tile counters (reduce_if_last): zeros, and every launch leaves them so. Allocated
    at a GEMV's first launch, which runs before any CUDA-graph capture (warm-up, the tuner's first run); traced
    (torch.compile, fake tensors), a zeroed allocation of the launch's own."""
    tiles = grid[0] * grid[2]
    if tiles > MAX_TILES:
        raise ValueError(f"a split-K GEMV of {grid[0]} x {grid[2]} tiles: more than {MAX_TILES} counters")
    if torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(like):
        return torch.zeros(tiles, dtype=torch.int32, device=like.device)
    counters = _COUNTERS.get(like.device)
    if counters is None:
        counters = _COUNTERS[like.device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=like.device)
    return counters


def split_reduction(cfg, partial: bool, x: torch.Tensor, grid) -> tuple[bool, bool, torch.Tensor | None]:
    """How a launch's split-K partials are reduced, when the caller does not take them (`partial`): (summed by the
    sum kernel after it, SERIAL: in the launch, the tile counters SERIAL counts on)."""
    split = cfg.SPLIT_K > 1 and not partial
    serial = split and cfg.SERIAL
    return split and not serial, serial, split_counters(x, grid) if serial else None


def launch_gemv(x, w, out, cfg, bias=None, residual=None, norm_w=None, eps=0.0, partial=False, ws=None):
    """out = epilogue(x @ w.T) (or fp32 partials into `out` if partial). ws: (SPLIT_K, M, N) fp32 when split."""
    (m, k), n = x.shape, w.shape[0]
    bm, sk = tuning.block_m(m), cfg.SPLIT_K
    check_config(cfg, m)
    grid = (triton.cdiv(n, cfg.BLOCK_N), sk, triton.cdiv(m, bm))
    summed, serial, counters = split_reduction(cfg, partial, x, grid)
    res_stride = residual.stride(0) if residual is not None else 0
    use_pdl = pdl(x, w)
    wrap_triton(_gemv_kernel)[grid](
        x, w, ws if summed else out, ws, counters, bias, residual, norm_w, m, n, k, x.stride(0), w.stride(0),
        out.stride(0), res_stride, eps, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, HAS_NORM=norm_w is not None, PARTIAL=partial or summed, SERIAL=serial,
        SPLIT_K=sk, EVEN_K=k % (sk * cfg.BLOCK_K) == 0, ONE_TILE=one_tile(k, cfg), BLOCK_M=bm, DOT_F32=dot_f32(x),
        PDL=use_pdl, PREFETCH=prefetch(use_pdl, w, norm_w), **cfg.meta(), **launch_opts(use_pdl))
    if summed:
        launch_split_sum(ws, out, bias, residual, use_pdl)


def bencher(w: torch.Tensor, run):
    """`make_bench` for tuning.choose: times run(cfg, weight) over rotating copies of `w` in a CUDA graph."""
    def make_bench():
        copies = tuning.weight_copies(w)
        return lambda cfg: tuning.graph_time(lambda i: run(cfg, copies[i]), len(copies))
    return make_bench


def norm_apart(x: torch.Tensor, norm_w: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, norm_w) for a GEMV with an RMSNorm prologue. One row keeps the norm inside the GEMV (gemv_tile).
    More rows (the tl.dot path) get it as a kernel of its own first, and the GEMV reads the normed rows (norm_w
    None): applied to the dot's operand inside its loop, the norm keeps Triton from pipelining the loads, which
    made the 16-row gate/up GEMV 1.6x (Qwen3-8B shape) to 3.2x (0.6B) slower than without it (benchmarks/RESULTS.md)."""
    if norm_w is None or tuning.block_m(x.shape[0]) == 1:
        return x, norm_w
    return torch.ops.nanovllm_triton.rms_norm(x, norm_w, float(eps)), None


@triton_op("nanovllm_triton::gemv", mutates_args=())
def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
         norm_w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """rms_norm(x) (if norm_w) @ w.T + bias (+ residual), for x with at most MAX_M rows, w (N, K) row-major."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    x, norm_w = norm_apart(x, norm_w, eps)
    (m, k), n = x.shape, w.shape[0]

    def run(cfg, weight):
        out = x.new_empty(m, n)
        ws = workspace("gemv_split_k", (cfg.SPLIT_K, m, n), torch.float32, x) if cfg.SPLIT_K > 1 else None
        launch_gemv(x, weight, out, cfg, bias, residual, norm_w, eps, ws=ws)
        return out

    name = "gemv" + ("_norm" if norm_w is not None else "") + ("_res" if residual is not None else "")
    cfg = tuning.choose(name, n, k, m, x, w, bencher(w, run), split=norm_w is None)
    if norm_w is not None and cfg.SPLIT_K > 1:  # the norm's 1/rms needs the whole row in one program
        cfg = dataclasses.replace(cfg, SPLIT_K=1)
    return run(cfg, w)


def register_site(op: str, fused, *, check=None, gemv_rows: bool = True, many_rows=None, layouts=None,
                  backend: str = "triton") -> None:
    """Register `fused(*args, parts=...)` as backend `backend` of site `op`. With gemv_rows, steps with more
    than MAX_M rows (prefill: a GEMM) run `many_rows(*args, parts=...)`, by default the site's native
    composition of the layer's resolved parts. layouts: see Impl.layouts (many_rows must then read them)."""
    native = get_op(op).native

    def build(parts: dict):
        fallback = functools.partial(many_rows or native, **({"parts": parts} if many_rows else parts))

        def run(*args):
            if gemv_rows and not 0 < args[0].shape[0] <= tuning.MAX_M:
                return fallback(*args)
            return fused(*args, parts=parts)
        run.__doc__ = fused.__doc__
        return run

    native_parts = {p: native_site(p) for p in get_op(op).parts}  # a part that is a site: its native composition
    register_impl(op, backend, devices=devices(), dtypes=DTYPES, check=check, build=build,
                  layouts=layouts)(build(native_parts))


def devices() -> tuple[str, ...]:
    """CUDA; also CPU under TRITON_INTERPRET=1 (the tests run every kernel that way)."""
    return ("cuda", "cpu") if tuning.INTERPRET else ("cuda",)
