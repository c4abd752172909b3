"""Backend `triton` of site `lm_head_sample`: final RMSNorm + LM head + greedy argmax, no logits in memory.

Kernel 1: each program runs the norm-fused GEMV over a run of consecutive vocab blocks, rounds the logits
to the model dtype (as the native's logits are) and keeps a running (max, first index of the max).
Kernel 2: one program per row reduces the per-program winners, ties to the smallest token id, which is
torch.argmax's rule. Steps with sampled rows (noise given) compute the logits with the fused norm + GEMV
and call the layer's `sample` op, so their semantics are the native site's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.workspace import workspace

core = load_sibling(__file__, "_gemv_core")
gemv_tile = core.gemv_tile
keep_block_max = core.keep_block_max


@triton.jit
def _lm_head_argmax_kernel(x_ptr, w_ptr, nw_ptr, val_ptr, idx_ptr, M, N, K, stride_xm, stride_wn, eps, num_progs,
                           blocks_per_prog, EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                           PREFETCH: tl.constexpr):
    """Grid (num_progs, 1, M blocks): program p covers vocab blocks [p * blocks_per_prog, +blocks_per_prog)."""
    pid, pid_m = tl.program_id(0), tl.program_id(2)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int32)
    for j in range(blocks_per_prog):
        pid_n = pid * blocks_per_prog + j
        logits, _ = gemv_tile(x_ptr, stride_xm, w_ptr, stride_wn, nw_ptr, x_ptr, 0, M, N, K, 0, K, eps, pid_m, pid_n,
                              True, False, EVEN_K, ONE_TILE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PDL, PREFETCH)
        logits = logits.to(w_ptr.dtype.element_ty).to(tl.float32)
        best, best_idx = keep_block_max(logits, pid_n, N, best, best_idx, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(val_ptr + offs_m * num_progs + pid, best, mask=offs_m < M)
    tl.store(idx_ptr + offs_m * num_progs + pid, best_idx, mask=offs_m < M)


@triton_op("nanovllm_triton::lm_head_argmax", mutates_args=())
def lm_head_argmax(h: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor) -> torch.Tensor:
    """argmax(rms_norm(h) @ w.T) per row (int64), for at most MAX_M rows."""
    h = h if h.stride(-1) == 1 else h.contiguous()
    (m, k), n = h.shape, w.shape[0]
    sms, bm = core.tuning.num_sms(h.device), core.tuning.block_m(m)

    def run(cfg, weight):
        core.check_config(cfg, m)
        blocks = triton.cdiv(n, cfg.BLOCK_N)
        per_prog = triton.cdiv(blocks, 8 * sms)  # about 8 programs per SM: few winners left to reduce
        progs = triton.cdiv(blocks, per_prog)
        val = workspace("argmax_partial_val", (m, progs), torch.float32, h)
        idx = workspace("argmax_partial_idx", (m, progs), torch.int32, h)
        pdl = core.pdl(h, weight)
        wrap_triton(_lm_head_argmax_kernel)[(progs, 1, triton.cdiv(m, bm))](
            h, weight, norm_w, val, idx, m, n, k, h.stride(0), weight.stride(0), eps, progs, per_prog,
            EVEN_K=k % cfg.BLOCK_K == 0, ONE_TILE=core.one_tile(k, cfg), BLOCK_M=bm, DOT_F32=core.dot_f32(h), PDL=pdl,
            PREFETCH=core.prefetch(pdl, weight, norm_w), **cfg.meta(), **core.launch_opts(pdl))
        return core.reduce_winners(val, idx, pdl)

    cfg = core.tuning.choose("lm_head_argmax", n, k, m, h, w, core.bencher(w, run), split=False)
    return run(cfg, w)


def lm_head_sample(h, norm_w, eps: float, lm_w, temperature, top_k, top_p, min_p, noise, *, parts):
    """Greedy steps (noise is None): fused argmax. Sampled steps: fused norm + GEMV, then the `sample` op."""
    if noise is None:
        return torch.ops.nanovllm_triton.lm_head_argmax(h, norm_w, eps, lm_w)
    logits = torch.ops.nanovllm_triton.gemv(h, lm_w, None, None, norm_w, eps)
    return parts["sample"](logits, temperature, top_k, top_p, min_p, noise)


core.register_site("lm_head_sample", lm_head_sample)
