"""Shared machinery of the `triton_quant` backends: weight-streaming GEMV tiles that read a QuantizedWeight
(nanovllm/quant/weights.py) in its packed form, the general quantized GEMV, and registration helpers.

The loop is _gemv_core's (the same grid, split-K, PDL and epilogues); what differs is the weight tile. A
tile of BLOCK_K columns is held as (BLOCK_N, NSUB, SUBW): NSUB sub-blocks of SUB columns that share one scale
(SUB = min(group, BLOCK_K); a group size is a power of two, or the whole row), SUBW = SUB / PACK stored
elements each (PACK columns per stored element: 1 for fp8 and int8, 2 for int4 bytes, 8 for int4 read as
32-bit words). Scales and offsets load as a (BLOCK_N, NSUB) tile, so a weight element costs one load of its
packed bits and no scale gather.
Integers decode without integer-to-float conversions (which run at a fraction of the FMA rate) and without a
subtraction per element: the integer's bits go to the top of the mantissa of 1.0 (one shift and one
bitwise op), giving a "unit" u = 1 + q / 16 (int4) or 1 + (q + 128) / 256 (int8), and q = UNIT * u + BIAS.
The FMAs accumulate u * x; UNIT, BIAS, the zero point, scales and offsets apply to sums: once per sub-block
(scale * UNIT * (u . x) + (scale * BIAS + offset) * sum(x)), or with one group per row (per-channel) once per
output after the reduction. fp8 converts in hardware. x loads as contiguous columns and splits in registers
into the columns of each nibble.
More than one row dequantizes the tile to x's dtype and runs tl.dot (int4 bytes: one dot per nibble).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import get_op, native_site, register_impl
from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.workspace import workspace
from nanovllm.quant.weights import FORMATS, is_quantized

core = load_sibling(__file__, "_gemv_core")
tuning = core.tuning
gdc_wait, gdc_launch_dependents = core.gdc_wait, core.gdc_launch_dependents
load_rows, dot_acc, store_partial, store_out = core.load_rows, core.dot_acc, core.store_partial, core.store_out
reduce_if_last = core.reduce_if_last
WEIGHTS_POLICY: tl.constexpr = tl.constexpr("evict_first")
FORMAT_IDS = {"fp8": 0, "int8": 1, "int4": 2}
INT4_WORDS = 3  # int4 read as 32-bit words of 8 nibbles (one row, rows a multiple of 8 columns)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Steps of more rows than the GEMVs take run the same kernel as a GEMM (BLOCK_M rows per program, the tile
# dequantized in registers for tl.dot) up to this many rows; beyond, the weight is dequantized once per call and
# multiplied by cuBLAS, whose GEMM outruns Triton's where the weight's bytes no longer dominate.
GEMM_MAX_ROWS = 512


def pack_of(fmt: str) -> int:
    return 2 if fmt == "int4" else 1


def words(qw: QW, m: int) -> bool:
    """Whether a launch reads this int4 weight as 32-bit words (INT4_WORDS): the one-row path, rows of a
    multiple of 8 columns, 4-byte aligned (allocations are; the storage offset says it without reading the
    pointer, which a traced fake tensor has not)."""
    q = qw.qweight
    return (qw.fmt == "int4" and tuning.block_m(m) == 1 and q.shape[1] % 4 == 0 and q.stride(0) % 4 == 0
            and q.stride(1) == 1 and q.storage_offset() % 4 == 0)


def stored(qw: QW, m: int) -> tuple[torch.Tensor, int]:
    """(the packed weight as a launch reads it, its stored elements per row)."""
    q = qw.qweight.view(torch.int32) if words(qw, m) else qw.qweight
    return q, q.shape[1]


def supported(w) -> str | None:
    """Why the quantized kernels cannot read weight w (a QuantizedWeight), or None."""
    g, k = w.group_size, w.in_features
    if g != k and (g < 2 or g & (g - 1)):
        return f"group size {g} is neither a power of two nor the whole row ({k})"
    if w.qweight.stride(-1) != 1 or w.scale.stride(-1) != 1:
        return "qweight and scale must be row-major"
    return None


@triton.jit
def decode_units(q, FORMAT: tl.constexpr, HIGH: tl.constexpr):
    """fp32 "units" u of packed elements q (uint8 for fp8 and int4, int8 for int8), the stored value being
    UNIT * u + BIAS (see `affine`): fp8 as is; an integer's bits placed in the top of the mantissa of 1.0,
    u = 1 + (q + 128) / 256 (int8) or 1 + nibble / 16 (int4, HIGH: the high nibble). No conversion or
    subtraction per element: the affine part is applied per sub-block or per output, to sums."""
    if FORMAT == 0:
        u = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif FORMAT == 1:
        u = (((q.to(tl.int32) + 128) << 15) | 0x3F800000).to(tl.float32, bitcast=True)
    else:
        b = q.to(tl.int32)
        nib = ((b << 15) if HIGH else (b << 19)) & 0x00780000
        u = (nib | 0x3F800000).to(tl.float32, bitcast=True)
    return u


@triton.jit
def affine(FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """(UNIT, BIAS): a stored value is UNIT * unit + BIAS, with int4's zero point 8 folded in when there is no
    offset."""
    if FORMAT == 0:
        unit, bias = 1.0, 0.0
    elif FORMAT == 1:
        unit, bias = 256.0, -384.0
    else:  # int4, as bytes or as words
        unit, bias = 16.0, -16.0 if HAS_OFFSET else -24.0
    return unit, bias


@triton.jit
def dequantized(u, s_unit, s_bias):
    """The weights u * scale * UNIT + (scale * BIAS + offset) of a tile, the (BLOCK_N, NSUB) factors broadcast
    over each sub-block."""
    return u * s_unit[:, :, None] + s_bias[:, :, None]


@triton.jit
def word_units(w, J: tl.constexpr):
    """The units (see decode_units) of nibble J (column 8i + J) of int32 words w: the nibble moved to bits
    19..22, under the exponent of 1.0."""
    if 4 * J <= 19:
        nib = (w << (19 - 4 * J)) & 0x00780000
    else:
        nib = (w >> (4 * J - 19)) & 0x00780000
    return (nib | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def split_last(t):
    """(t[..., 0::2], t[..., 1::2]) of a 3-D t."""
    return tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 2, 2)))


@triton.jit
def split8(x, NSUB: tl.constexpr, SUBW: tl.constexpr):
    """x (NSUB, 8 * SUBW) as the eight (NSUB, SUBW) tensors of columns 8i + J, J = 0..7."""
    a, b = split_last(tl.reshape(x, (NSUB, SUBW, 8)))  # a: J = 0, 2, 4, 6; b: J = 1, 3, 5, 7
    a0, a1 = split_last(a)  # J = 0, 4 and 2, 6
    b0, b1 = split_last(b)  # J = 1, 5 and 3, 7
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def word_dot(q, x, NSUB: tl.constexpr, SUBW: tl.constexpr):
    """(BLOCK_N, NSUB, SUBW) sums over each int32 word's 8 nibbles of unit * x."""
    x0, x1, x2, x3, x4, x5, x6, x7 = split8(x, NSUB, SUBW)
    p = word_units(q, 0) * x0[None, :, :]
    p += word_units(q, 1) * x1[None, :, :]
    p += word_units(q, 2) * x2[None, :, :]
    p += word_units(q, 3) * x3[None, :, :]
    p += word_units(q, 4) * x4[None, :, :]
    p += word_units(q, 5) * x5[None, :, :]
    p += word_units(q, 6) * x6[None, :, :]
    p += word_units(q, 7) * x7[None, :, :]
    return p


@triton.jit
def load_qtile(w_ptr, s_ptr, o_ptr, offs_n, mask_n, stride_wn, stride_sn, k, k_hi, kb_hi, group,
               FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr, LOAD_SCALES: tl.constexpr, PACK: tl.constexpr,
               SUB: tl.constexpr,
               NSUB: tl.constexpr, SUBW: tl.constexpr):
    """The packed (BLOCK_N, NSUB, SUBW) values of columns [k, k + NSUB * SUB) (zeros past stored element kb_hi,
    column k_hi) and their (BLOCK_N, NSUB) fp32 factors (scale * UNIT, scale * BIAS + offset), zeros without
    LOAD_SCALES. The values' mask is on the stored index, so it stays uniform over 16-byte vectors."""
    idx = tl.arange(0, NSUB)[:, None] * SUBW + tl.arange(0, SUBW)[None, :]  # stored element within the tile
    mask = mask_n[:, None, None] & (k // PACK + idx < kb_hi)[None, :, :]
    rows = offs_n.to(tl.int64)  # int64: big vocab x hidden
    q = tl.load(w_ptr + rows[:, None, None] * stride_wn + (k // PACK + idx)[None, :, :], mask=mask, other=0,
                eviction_policy=WEIGHTS_POLICY)
    sub_col = k + tl.arange(0, NSUB) * SUB
    smask = mask_n[:, None] & (sub_col < k_hi)[None, :]
    sptr = rows[:, None] * stride_sn + (sub_col // group)[None, :]
    s_unit = tl.zeros((offs_n.shape[0], NSUB), tl.float32)
    s_bias = tl.zeros((offs_n.shape[0], NSUB), tl.float32)
    if LOAD_SCALES:
        unit, bias = affine(FORMAT, HAS_OFFSET)
        s = tl.load(s_ptr + sptr, mask=smask, other=0.0).to(tl.float32)
        s_unit, s_bias = s * unit, s * bias
        if HAS_OFFSET:
            s_bias += tl.load(o_ptr + sptr, mask=smask, other=0.0).to(tl.float32)
    return q, s_unit, s_bias


@triton.jit
def load_x(x_ptr, row_off, cols, mask, perm_ptr, nw_ptr, HAS_PERM: tl.constexpr, HAS_NORM: tl.constexpr):
    """(fp32 x at stored columns `cols`, fp32 norm weights there): through the act-order permutation, x's
    column perm[c] feeds stored column c (and so does its norm weight). Norm weights are ones without HAS_NORM."""
    src = cols
    if HAS_PERM:
        src = tl.load(perm_ptr + cols, mask=mask, other=0)
    x = tl.load(x_ptr + row_off + src, mask=mask, other=0.0).to(tl.float32)
    nw = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_NORM:
        nw = tl.load(nw_ptr + src, mask=mask, other=0.0).to(tl.float32)
    return x, nw


@triton.jit
def pairs(x, PACK: tl.constexpr):
    """(even columns, odd columns) of a 2-D x for int4's low and high nibbles (PACK 2); (x, x) otherwise."""
    if PACK == 2:
        lo, hi = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
    else:
        lo, hi = x, x
    return lo, hi


@triton.jit
def fma_tile(acc, ss, xs, q, s_unit, s_bias, x_ptr, row_off, k, k_hi, perm_ptr, nw_ptr, FORMAT: tl.constexpr,
             HAS_PERM: tl.constexpr, HAS_NORM: tl.constexpr, SCALE_LAST: tl.constexpr, PACK: tl.constexpr,
             NSUB: tl.constexpr, SUB: tl.constexpr):
    """One row over one tile; ss += x * x (HAS_NORM). x loads as contiguous (NSUB, SUB) columns; int4 splits
    them into the even and odd columns its nibbles multiply. Each weight element costs its unit's decode and
    one FMA with x: SCALE_LAST: acc (BLOCK_N, NSUB, SUB / PACK) += u * x elementwise (reduced once at the end),
    xs += x (the row sum BIAS and the offset multiply). Otherwise acc (BLOCK_N, NSUB) += scale * UNIT * (u . x)
    + (scale * BIAS + offset) * sum(x) per sub-block."""
    cols = k + tl.arange(0, NSUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]
    x, nw = load_x(x_ptr, row_off, cols, cols < k_hi, perm_ptr, nw_ptr, HAS_PERM, HAS_NORM)
    if HAS_NORM:
        ss += x * x
        x = x * nw
    x_lo, x_hi = pairs(x, PACK)
    if FORMAT == 3:
        p = word_dot(q, x, NSUB, SUB // 8)
        if SCALE_LAST:
            acc += p
            xs += x
        else:
            acc += s_unit * tl.sum(p, axis=2) + s_bias * tl.sum(x, axis=1)[None, :]
    elif SCALE_LAST:
        acc += decode_units(q, FORMAT, False) * x_lo[None, :, :]
        if PACK == 2:
            acc += decode_units(q, FORMAT, True) * x_hi[None, :, :]
        xs += x
    else:
        dot = tl.sum(decode_units(q, FORMAT, False) * x_lo[None, :, :], axis=2)
        if PACK == 2:
            dot += tl.sum(decode_units(q, FORMAT, True) * x_hi[None, :, :], axis=2)
        acc += s_unit * dot + s_bias * tl.sum(x, axis=1)[None, :]
    return acc, ss, xs


@triton.jit
def qgemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, o_ptr, stride_sn, perm_ptr, group, nw_ptr, r_ptr,
               stride_rm, M, N, K, k_lo, k_hi, kb_hi, eps, pid_m, pid_n, FORMAT: tl.constexpr,
               HAS_OFFSET: tl.constexpr,
               HAS_PERM: tl.constexpr, SCALE_LAST: tl.constexpr, SUB: tl.constexpr, HAS_NORM: tl.constexpr,
               HAS_RES: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """(x[rows] @ W[cols, k_lo:k_hi].T, the residual's tile) for a quantized W: fp32 (BLOCK_M, BLOCK_N) each,
    as _gemv_core.gemv_tile (HAS_NORM: RMSNorm of x on the fly, needs k_lo=0, k_hi=K; PDL/PREFETCH: the
    first weight tile is issued before the wait on the kernel before). kb_hi: the stored elements' end of the
    range (a multiple of 16 where it can be, for vector loads). SCALE_LAST (one row, one group per row): the
    scale and offset apply once per output, after the reduction."""
    PACK: tl.constexpr = 8 if FORMAT == 3 else (2 if FORMAT == 2 else 1)
    NSUB: tl.constexpr = BLOCK_K // SUB
    SUBW: tl.constexpr = SUB // PACK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    r = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if BLOCK_M == 1:
        if PDL:
            gdc_launch_dependents()
        if PDL and not PREFETCH:
            gdc_wait()
        q, s, o = load_qtile(w_ptr, s_ptr, o_ptr, offs_n, mask_n, stride_wn, stride_sn, k_lo, k_hi, kb_hi, group,
                             FORMAT, HAS_OFFSET, not SCALE_LAST, PACK, SUB, NSUB, SUBW)
        if PDL and PREFETCH:
            gdc_wait()
        if HAS_RES:
            r = load_rows(r_ptr, stride_rm, offs_m, offs_n, M, N)
        row_off = pid_m * stride_xm
        if SCALE_LAST:
            acc = tl.zeros((BLOCK_N, NSUB, SUBW), tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, NSUB), tl.float32)
        ss = tl.zeros((NSUB, SUB), tl.float32)
        xs = tl.zeros((NSUB, SUB), tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            if ONE_TILE:
                acc, ss, xs = fma_tile(acc, ss, xs, q, s, o, x_ptr, row_off, k, k_hi, perm_ptr, nw_ptr, FORMAT,
                                       HAS_PERM, HAS_NORM, SCALE_LAST, PACK, NSUB, SUB)
            else:  # the next tile's loads in flight during this one's FMAs (all masked on the last step)
                qn, sn, on = load_qtile(w_ptr, s_ptr, o_ptr, offs_n, mask_n, stride_wn, stride_sn, k + BLOCK_K,
                                        k_hi, kb_hi, group, FORMAT, HAS_OFFSET, not SCALE_LAST, PACK, SUB, NSUB, SUBW)
                acc, ss, xs = fma_tile(acc, ss, xs, q, s, o, x_ptr, row_off, k, k_hi, perm_ptr, nw_ptr, FORMAT,
                                       HAS_PERM, HAS_NORM, SCALE_LAST, PACK, NSUB, SUB)
                q, s, o = qn, sn, on
        if SCALE_LAST:
            out = tl.sum(tl.sum(acc, axis=2), axis=1)
            unit, bias = affine(FORMAT, HAS_OFFSET)
            s_row = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
            s_bias = s_row * bias
            if HAS_OFFSET:
                s_bias += tl.load(o_ptr + offs_n.to(tl.int64) * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
            out = out * (s_row * unit) + s_bias * tl.sum(tl.sum(xs, axis=1), axis=0)
        else:
            out = tl.sum(acc, axis=1)
        out = out[None, :]
        if HAS_NORM:
            out = out * tl.rsqrt(tl.sum(tl.sum(ss, axis=1), axis=0) / K + eps)
    else:
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        if HAS_RES:
            r = load_rows(r_ptr, stride_rm, offs_m, offs_n, M, N)
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        ss = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        cols = tl.arange(0, BLOCK_K)[None, :]
        row_off = offs_m[:, None] * stride_xm
        for k in range(k_lo, k_hi, BLOCK_K):
            q, s, o = load_qtile(w_ptr, s_ptr, o_ptr, offs_n, mask_n, stride_wn, stride_sn, k, k_hi, kb_hi, group,
                                 FORMAT, HAS_OFFSET, True, PACK, SUB, NSUB, SUBW)
            x, nw = load_x(x_ptr, row_off, k + cols, mask_m[:, None] & (k + cols < k_hi), perm_ptr, nw_ptr,
                           HAS_PERM, HAS_NORM)
            if HAS_NORM:
                ss += x * x
                x = x * nw
            x_lo, x_hi = pairs(x.to(dtype), PACK)
            w = tl.reshape(dequantized(decode_units(q, FORMAT, False), s, o), (BLOCK_N, BLOCK_K // PACK))
            acc = dot_acc(acc, x_lo, w.to(dtype), DOT_F32)
            if PACK == 2:
                w = tl.reshape(dequantized(decode_units(q, FORMAT, True), s, o), (BLOCK_N, BLOCK_K // PACK))
                acc = dot_acc(acc, x_hi, w.to(dtype), DOT_F32)
        out = acc
        if HAS_NORM:
            out = out * tl.rsqrt(tl.sum(ss, axis=1) / K + eps)[:, None]
    return out, r


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, perm_ptr, y_ptr, ws_ptr, cnt_ptr, b_ptr, r_ptr, nw_ptr, M, N, K, KB,
                  group, stride_xm, stride_wn, stride_sn, stride_ym, stride_rm, eps, FORMAT: tl.constexpr,
                  HAS_OFFSET: tl.constexpr, HAS_PERM: tl.constexpr, SCALE_LAST: tl.constexpr, SUB: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr, PARTIAL: tl.constexpr,
                  SERIAL: tl.constexpr, SPLIT_K: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                  PREFETCH: tl.constexpr):
    """Grid (N blocks, SPLIT_K, M blocks), as _gemv_core._gemv_kernel; KB: stored elements per row of w.
    PARTIAL: y is an fp32 (SPLIT_K, M, N) workspace of partial sums; SERIAL: the tile's last program reduces them
    (reduce_if_last, partials in ws, counters at cnt)."""
    PACK: tl.constexpr = 8 if FORMAT == 3 else (2 if FORMAT == 2 else 1)
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * span
    k_hi = tl.minimum(K, k_lo + span)
    kb_hi = tl.minimum(KB, (k_lo + span) // PACK)
    acc, r = qgemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, o_ptr, stride_sn, perm_ptr, group, nw_ptr, r_ptr,
                        stride_rm, M, N, K, k_lo, k_hi, kb_hi, eps, pid_m, pid_n, FORMAT, HAS_OFFSET, HAS_PERM,
                        SCALE_LAST, SUB, HAS_NORM, HAS_RES and not (PARTIAL or SERIAL), ONE_TILE, BLOCK_M,
                        BLOCK_N, BLOCK_K, DOT_F32, PDL, PREFETCH)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if PARTIAL:
        store_partial(y_ptr, acc, pid_k, offs_m, offs_n, M, N)
    elif SERIAL:
        reduce_if_last(ws_ptr, cnt_ptr, acc, y_ptr, stride_ym, b_ptr, r_ptr, stride_rm, pid_k, offs_m, offs_n, M, N,
                       SPLIT_K, HAS_BIAS, HAS_RES)
    else:
        store_out(acc, y_ptr, stride_ym, b_ptr, r, offs_m, offs_n, M, N, HAS_BIAS, HAS_RES)


# -- launching -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QW:
    """A QuantizedWeight's tensors as the kernels take them (qweight as raw bytes for fp8)."""

    fmt: str
    qweight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    perm: torch.Tensor | None
    group: int
    k: int

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @property
    def tensors(self) -> tuple:
        return self.qweight, self.scale, self.offset, self.perm

    def with_tensors(self, qweight, scale, offset, perm) -> QW:
        return dataclasses.replace(self, qweight=qweight, scale=scale, offset=offset, perm=perm)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.offset) if t is not None)

    def tag(self) -> str:
        """The tuning key's name of this weight's format: format, group (ch: per-channel), zero point."""
        g = "ch" if self.group == self.k else f"g{self.group}"
        return f"{self.fmt}_{g}" + ("_z" if self.offset is not None else "")


def qw_of(fmt: str, qweight, scale, offset, perm, group: int, k: int) -> QW:
    if fmt not in FORMAT_IDS:
        raise ValueError(f"unknown weight format {fmt!r}; supported: {', '.join(FORMATS)}")
    if fmt == "fp8":
        qweight = qweight.view(torch.uint8)
    return QW(fmt, qweight, scale, offset, perm, group, k)


def sub_block(qw: QW, block_k: int) -> int:
    """Columns per scale-uniform sub-block of a BLOCK_K tile."""
    return block_k if qw.group == qw.k else min(qw.group, block_k)


def check_qconfig(cfg, m: int, qw: QW) -> None:
    core.check_config(cfg, m)
    pack = pack_of(qw.fmt)
    if cfg.BLOCK_K < 16 or (tuning.block_m(m) > 1 and cfg.BLOCK_K // pack < 16):
        raise ValueError(f"{cfg}: BLOCK_K too small for {qw.fmt} ({m} rows)")


def kernel_args(qw: QW, cfg, m: int) -> dict:
    """The quantization constexprs of a launch."""
    return dict(FORMAT=INT4_WORDS if words(qw, m) else FORMAT_IDS[qw.fmt], HAS_OFFSET=qw.offset is not None,
                HAS_PERM=qw.perm is not None, SCALE_LAST=qw.group == qw.k and tuning.block_m(m) == 1,
                SUB=sub_block(qw, cfg.BLOCK_K))


def prefetch(use_pdl: bool, norm_w) -> bool:
    """The first weight tile before the PDL wait: a QuantizedWeight's buffers are never written by a kernel
    in flight; a norm weight read early must be a Parameter (see _gemv_core.prefetch)."""
    return use_pdl and (norm_w is None or isinstance(norm_w, torch.nn.Parameter))


def launch_qgemv(x, qw: QW, out, cfg, bias=None, residual=None, norm_w=None, eps=0.0, partial=False, ws=None):
    """out = epilogue(x @ W.T) (or fp32 partials into `out` if partial). ws: (SPLIT_K, M, N) fp32 when split."""
    (m, k), n = x.shape, qw.n
    bm, sk = rows_per_program(m), cfg.SPLIT_K
    check_qconfig(cfg, m, qw)
    grid = (triton.cdiv(n, cfg.BLOCK_N), sk, triton.cdiv(m, bm))
    summed, serial, counters = core.split_reduction(cfg, partial, x, grid)
    res_stride = residual.stride(0) if residual is not None else 0
    use_pdl = core.pdl(x, qw.qweight)
    q, kb = stored(qw, m)
    wrap_triton(_qgemv_kernel)[grid](
        x, q, qw.scale, qw.offset, qw.perm, ws if summed else out, ws, counters, bias, residual, norm_w, m, n, k, kb,
        qw.group, x.stride(0), q.stride(0), qw.scale.stride(0), out.stride(0), res_stride, eps,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_NORM=norm_w is not None,
        PARTIAL=partial or summed, SERIAL=serial, SPLIT_K=sk, ONE_TILE=core.one_tile(k, cfg), BLOCK_M=bm,
        DOT_F32=core.dot_f32(x), PDL=use_pdl, PREFETCH=prefetch(use_pdl, norm_w), **kernel_args(qw, cfg, m),
        **cfg.meta(), **core.launch_opts(use_pdl))
    if summed:
        core.launch_split_sum(ws, out, bias, residual, use_pdl)


def rows_per_program(m: int) -> int:
    """BLOCK_M: 1 (the FMA path), 16 (the GEMVs' tl.dot path), or 64 / 128 rows of a GEMM."""
    return tuning.block_m(m) if m <= tuning.MAX_M else (64 if m <= 64 else 128)


def gemm_config(m: int, qw: QW):
    """The GEMM's launch config (not tuned: every row count would be a tuning key of its own)."""
    return tuning.Config(128 if m > 64 else 64, 128 if qw.fmt == "int4" else 64, 1, 8 if m > 64 else 4, 3)


def candidates(n: int, k: int, m: int, sms: int, qw: QW, split: bool = True) -> list:
    """Configs worth timing, the likeliest first (tuning stops at its time budget, and each new config compiles).

    One row: tiles of 64, 32 or 128 bytes of packed weights per thread (16-byte loads in flight; the dense
    GEMV's rule in bytes, not elements), 4, 8 or 2 warps, BLOCK_N 8 / 16 / 4 / 32; split-K only while the N blocks
    alone leave SMs idle. More rows: the dense tl.dot candidates."""
    if tuning.block_m(m) > 1:
        out = tuning.candidates(n, k, m, sms, split)
    else:
        bytes_per_col = 0.5 if qw.fmt == "int4" else 1.0
        kmax = max(triton.next_power_of_2(k), 16)
        out = []
        for nw in (4, 8, 2):
            for per_thread in (64, 32, 128):
                for bn in (8, 16, 4, 32):
                    bk = int(per_thread * 32 * nw / (bn * bytes_per_col))
                    if not 16 <= bk <= kmax:
                        continue
                    blocks = triton.cdiv(n, bn)
                    for sk in (1, 2, 4) if split else (1,):
                        if sk == 1 or (blocks < 2 * sms and blocks * sk <= 8 * sms and k >= sk * bk):
                            out += tuning.Config(bn, bk, sk, nw, 1).with_serial_twins()
    valid = []
    for c in dict.fromkeys(out):
        try:
            check_qconfig(c, m, qw)
            valid.append(c)
        except ValueError:
            pass
    return valid


def heuristic(n: int, k: int, m: int, sms: int, qw: QW, split: bool = True):
    cfg = tuning.heuristic(n, k, m, sms, split)
    if not tuning.INTERPRET and qw.fmt == "int4" and tuning.block_m(m) == 1:
        cfg = dataclasses.replace(cfg, BLOCK_K=2048)  # the dense tile's bytes per thread
    return cfg


def choose(op: str, x: torch.Tensor, qw: QW, run, split: bool = True):
    """The launch config of `op` on this weight: tuned once per (format, shape, rows) and cached per GPU, as the
    dense GEMVs' (_tuning.choose); `run(cfg, qw)` launches it."""
    (m, k), n = x.shape, qw.n
    if tuning._forced:
        return tuning._forced[-1]
    name = f"{op}_{qw.tag()}"
    memo = (name, n, k, tuning.m_bucket(m), qw.qweight.dtype, x.device)
    if memo in tuning._memo:
        return tuning._memo[memo]
    sms = tuning.num_sms(x.device)
    if x.device.type != "cuda":
        return heuristic(n, k, m, sms, qw, split)
    slug = tuning.gpu_slug(x.device)
    key = f"{name}:{str(x.dtype).removeprefix('torch.')}:N{n}:K{k}:M{tuning.m_bucket(m)}"
    hit = tuning._table(slug).get(key)
    if hit is not None:
        tuning._memo[memo] = tuning.Config.of(hit)
        return tuning._memo[memo]
    if not tuning._can_tune(x, *qw.tensors[:2]):
        return heuristic(n, k, m, sms, qw, split)
    copies = tuning.num_copies(qw.nbytes(), x.device)
    sets = [qw] + [qw.with_tensors(*(None if t is None else t.clone() for t in qw.tensors)) for _ in range(copies - 1)]
    bench = lambda cfg: tuning.graph_time(lambda i: run(cfg, sets[i]), len(sets))  # noqa: E731
    configs = [heuristic(n, k, m, sms, qw, split), *candidates(n, k, m, sms, qw, split)]
    best, best_t = tuning.tune(key, configs, bench)
    tuning._record(slug, key, best, best_t)
    tuning._memo[memo] = best
    return best


@triton_op("nanovllm_triton::qgemv", mutates_args=())
def qgemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
          perm: torch.Tensor | None, fmt: str, group: int, bias: torch.Tensor | None, residual: torch.Tensor | None,
          norm_w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """rms_norm(x) (if norm_w) @ W.T + bias (+ residual) for a quantized W (fmt, qweight, scale, offset, perm,
    group): the GEMV up to MAX_M rows of x, the GEMM beyond."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    qw = qw_of(fmt, qweight, scale, offset, perm, group, k)

    def run(cfg, w):
        out = x.new_empty(m, w.n)
        ws = workspace("gemv_split_k", (cfg.SPLIT_K, m, w.n), torch.float32, x) if cfg.SPLIT_K > 1 else None
        launch_qgemv(x, w, out, cfg, bias, residual, norm_w, eps, ws=ws)
        return out

    if m > tuning.MAX_M:
        return run(tuning._forced[-1] if tuning._forced else gemm_config(m, qw), qw)
    name = "qgemv" + ("_norm" if norm_w is not None else "") + ("_res" if residual is not None else "")
    cfg = choose(name, x, qw, run, split=norm_w is None)
    if norm_w is not None and cfg.SPLIT_K > 1:  # the norm's 1/rms needs the whole row in one program
        cfg = dataclasses.replace(cfg, SPLIT_K=1)
    return run(cfg, qw)


def weight_args(w) -> tuple:
    """The QuantizedWeight's arguments of the quantized torch ops (after x): qweight, scale, offset, perm,
    format, group size."""
    return w.qweight, w.scale, w.offset, w.perm, w.format, w.group_size


def gemv(x, w, bias=None, residual=None, norm_w=None, eps: float = 0.0) -> torch.Tensor:
    """The GEMV of weight w, quantized or dense (a layer may keep some weights dense)."""
    if is_quantized(w):
        return torch.ops.nanovllm_triton.qgemv(x, *weight_args(w), bias, residual, norm_w, eps)
    return torch.ops.nanovllm_triton.gemv(x, w, bias, residual, norm_w, eps)


def interleave_gate_up(w):
    """The fused MLP kernels' gate/up row layout (_gemv_core.interleave_gate_up) of a dense or quantized weight."""
    return w.map_rows(core.interleave_gate_up) if is_quantized(w) else core.interleave_gate_up(w)


# -- registration ----------------------------------------------------------------------------------------
def _weights_in(args) -> list:
    out = []
    for a in args:
        if is_quantized(a):
            out.append(a)
        elif isinstance(a, tuple):  # a LayerWeights
            out += [w for w in a if is_quantized(w)]
    return out


def kernels_read(args) -> bool:
    """Whether every quantized weight among the call's arguments is one the kernels read."""
    return all(supported(w) is None for w in _weights_in(args))


def register_quant_site(op: str, fused, *, check=None, many_rows=None, layouts=None) -> None:
    """Register `fused(*args, parts=...)` as backend `triton_quant` of site `op` for quantized weights; steps
    with more than MAX_M rows, or a weight the kernels cannot read, run `many_rows(*args, parts=...)`, by
    default the site's native composition of the layer's resolved parts (see _gemv_core.register_site)."""
    native = get_op(op).native

    def build(parts: dict):
        fallback = functools.partial(many_rows or native, **({"parts": parts} if many_rows else parts))

        def run(*args):
            if not 0 < args[0].shape[0] <= tuning.MAX_M or not kernels_read(args):
                return fallback(*args)
            return fused(*args, parts=parts)
        run.__doc__ = fused.__doc__
        return run

    native_parts = {p: native_site(p) for p in get_op(op).parts}
    register_impl(op, "triton_quant", devices=core.devices(), dtypes=DTYPES, check=check, build=build,
                  layouts=layouts, formats=FORMATS)(build(native_parts))
