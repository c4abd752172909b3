"""Backend `triton` of `sample`: temperature sampling (the exponential race) in one pass over the logits.

The native op computes softmax(logits / T) / noise and its argmax: five passes over an fp32 copy of the
(rows, vocab) logits, about 1.6 GB a step at 256 rows of Qwen3's vocabulary. The argmax is the same as
that of logits / T - log(noise) (the softmax's normalizer is common to a row, and log is monotonic), which
one kernel computes from the logits and the noise as it reads them: each program keeps the best (score,
first token id) of its slice of the vocabulary, and a second kernel reduces the slices per row. Rows with
T = 0 score the raw logits (greedy). Steps that filter (top-k, top-p, min-p) or have no noise (all greedy)
run the native op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import get_op, register_impl
from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.workspace import workspace

core = load_sibling(__file__, "_gemv_core")
gdc_launch_dependents, gdc_wait = core.gdc_launch_dependents, core.gdc_wait


@triton.jit
def _race_kernel(l_ptr, t_ptr, e_ptr, val_ptr, idx_ptr, V, stride_l, stride_e, chunk, num_chunks,
                 BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows, chunks): the best (score, token id) over vocab [c * chunk, (c + 1) * chunk) of row m."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    m, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    t = tl.load(t_ptr + m).to(tl.float32)
    sampled = t > 0
    t = tl.maximum(t, 1e-5)  # the native's clamp
    best = tl.full((BLOCK,), float("-inf"), tl.float32)  # per lane: the best score and its first token id
    best_idx = tl.zeros((BLOCK,), tl.int32)
    end = tl.minimum(V, (c + 1) * chunk)
    for v0 in range(c * chunk, end, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        mask = offs < end
        logit = tl.load(l_ptr + m * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
        noise = tl.load(e_ptr + m * stride_e + offs, mask=mask, other=1.0)
        score = tl.where(sampled, logit / t - tl.log(noise), logit)
        take = mask & (score > best)  # strict: an earlier token keeps a tie
        best, best_idx = tl.where(take, score, best), tl.where(take, offs, best_idx)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_idx, 2**31 - 1), axis=0)
    tl.store(val_ptr + m * num_chunks + c, top)
    tl.store(idx_ptr + m * num_chunks + c, first)


@triton_op("nanovllm_triton::sample_race", mutates_args=())
def sample_race(logits: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor, block: int = 2048,
                blocks_per_chunk: int = 4) -> torch.Tensor:
    """argmax(logits / T - log(noise)) per row, argmax(logits) where T = 0; int64 (rows,)."""
    rows, vocab = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    noise = noise if noise.stride(-1) == 1 else noise.contiguous()
    block = min(block, triton.next_power_of_2(vocab))
    chunk = block * blocks_per_chunk
    chunks = triton.cdiv(vocab, chunk)
    val = workspace("argmax_partial_val", (rows, chunks), torch.float32, logits)
    idx = workspace("argmax_partial_idx", (rows, chunks), torch.int32, logits)
    pdl = core.pdl(logits, noise)
    if rows:
        wrap_triton(_race_kernel)[(rows, chunks)](
            logits, temperature, noise, val, idx, vocab, logits.stride(0), noise.stride(0), chunk, chunks,
            BLOCK=block, PDL=pdl, num_warps=max(1, min(8, block // 256)), **core.launch_opts(pdl))
    return core.reduce_winners(val, idx, pdl)


@register_impl("sample", "triton", devices=core.devices(), dtypes=core.DTYPES)
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
           min_p: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """Temperature-only steps in two kernels; greedy-only and filtered steps take the native op."""
    if noise is None or top_k is not None or top_p is not None or min_p is not None:
        return get_op("sample").native(logits, temperature, top_k, top_p, min_p, noise)
    return torch.ops.nanovllm_triton.sample_race(logits, temperature, noise)
