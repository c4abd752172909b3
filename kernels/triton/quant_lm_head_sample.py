"""Backend `triton_quant` of site `lm_head_sample` for a quantized LM head: final RMSNorm + quantized LM head
GEMV + greedy argmax with no logits in memory, as the dense backend (lm_head_sample.py): kernel 1 keeps each
program's running (max, first index of the max) over a run of vocab blocks, kernel 2 reduces the winners
(ties to the smallest token id, torch.argmax's rule). Sampled steps compute the logits with the fused norm +
quantized GEMV and call the layer's `sample` op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.workspace import workspace
from nanovllm.quant.weights import is_quantized

qcore = load_sibling(__file__, "_quant_core")
core = qcore.core
qgemv_tile = qcore.qgemv_tile
keep_block_max = core.keep_block_max


@triton.jit
def _qlm_head_argmax_kernel(x_ptr, w_ptr, s_ptr, o_ptr, perm_ptr, nw_ptr, val_ptr, idx_ptr, M, N, K, KB, group,
                            stride_xm, stride_wn, stride_sn, eps, num_progs, blocks_per_prog, FORMAT: tl.constexpr,
                            HAS_OFFSET: tl.constexpr, HAS_PERM: tl.constexpr, SCALE_LAST: tl.constexpr,
                            SUB: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """Grid (num_progs, 1, M blocks): program p covers vocab blocks [p * blocks_per_prog, +blocks_per_prog)."""
    pid, pid_m = tl.program_id(0), tl.program_id(2)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int32)
    for j in range(blocks_per_prog):
        pid_n = pid * blocks_per_prog + j
        logits, _ = qgemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, o_ptr, stride_sn, perm_ptr, group, nw_ptr,
                               x_ptr, 0, M, N, K, 0, K, KB, eps, pid_m, pid_n, FORMAT, HAS_OFFSET, HAS_PERM, SCALE_LAST,
                               SUB, True, False, ONE_TILE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PDL, PREFETCH)
        logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)  # the native's logits are in the model dtype
        best, best_idx = keep_block_max(logits, pid_n, N, best, best_idx, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(val_ptr + offs_m * num_progs + pid, best, mask=offs_m < M)
    tl.store(idx_ptr + offs_m * num_progs + pid, best_idx, mask=offs_m < M)


@triton_op("nanovllm_triton::qlm_head_argmax", mutates_args=())
def qlm_head_argmax(h: torch.Tensor, norm_w: torch.Tensor, eps: float, qweight: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor | None, perm: torch.Tensor | None, fmt: str, group: int) -> torch.Tensor:
    """argmax(rms_norm(h) @ W.T) per row (int64) for a quantized W and at most MAX_M rows."""
    h = h if h.stride(-1) == 1 else h.contiguous()
    m, k = h.shape
    qw = qcore.qw_of(fmt, qweight, scale, offset, perm, group, k)
    sms, bm = core.tuning.num_sms(h.device), core.tuning.block_m(m)

    def run(cfg, w):
        qcore.check_qconfig(cfg, m, w)
        blocks = triton.cdiv(w.n, cfg.BLOCK_N)
        per_prog = triton.cdiv(blocks, 8 * sms)  # about 8 programs per SM: few winners left to reduce
        progs = triton.cdiv(blocks, per_prog)
        val = workspace("argmax_partial_val", (m, progs), torch.float32, h)
        idx = workspace("argmax_partial_idx", (m, progs), torch.int32, h)
        pdl = core.pdl(h, w.qweight)
        q, kb = qcore.stored(w, m)
        wrap_triton(_qlm_head_argmax_kernel)[(progs, 1, triton.cdiv(m, bm))](
            h, q, w.scale, w.offset, w.perm, norm_w, val, idx, m, w.n, k, kb, w.group, h.stride(0), q.stride(0),
            w.scale.stride(0), eps, progs, per_prog, ONE_TILE=core.one_tile(k, cfg), BLOCK_M=bm,
            DOT_F32=core.dot_f32(h), PDL=pdl, PREFETCH=qcore.prefetch(pdl, norm_w), **qcore.kernel_args(w, cfg, m),
            **cfg.meta(), **core.launch_opts(pdl))
        return core.reduce_winners(val, idx, pdl)

    return run(qcore.choose("qlm_head_argmax", h, qw, run, split=False), qw)


def lm_head_sample(h, norm_w, eps: float, lm_w, temperature, top_k, top_p, min_p, noise, *, parts):
    """Greedy steps (noise is None): fused argmax. Sampled steps: fused norm + GEMV, then the `sample` op."""
    if noise is None:
        if not is_quantized(lm_w):
            return torch.ops.nanovllm_triton.lm_head_argmax(h, norm_w, eps, lm_w)
        return torch.ops.nanovllm_triton.qlm_head_argmax(h, norm_w, eps, *qcore.weight_args(lm_w))
    logits = qcore.gemv(h, lm_w, None, None, norm_w, eps)
    return parts["sample"](logits, temperature, top_k, top_p, min_p, noise)


qcore.register_quant_site("lm_head_sample", lm_head_sample)
