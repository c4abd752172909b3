"""Backend `triton` of `ngram_lookup`: the prompt lookup of every row in one launch.

The native op is some thirty small tensor ops, each a launch of its own inside a pipelined verify step's graph.
Here one program per row scans the row's tokens in blocks: at each end position it counts how many of the
suffix's last n_max tokens the tokens before it repeat, keeps the best position (the longest run of at least
n_min, then the latest), and copies up to k tokens that follow it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")


@triton.jit
def _lookup_kernel(h_ptr, len_ptr, cap_ptr, out_ptr, width, stride_h, stride_o,
                   K: tl.constexpr, N_MIN: tl.constexpr, N_MAX: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Grid (rows,): out[row, :K] the drafts (0 past the count), out[row, K] their count."""
    row = tl.program_id(0).to(tl.int64)
    h = h_ptr + row * stride_h
    length = tl.load(len_ptr + row).to(tl.int64)
    best = tl.full((BLOCK,), -1, tl.int64)  # per lane: run * width + end, the best seen
    for e0 in range(0, length, BLOCK):
        end = e0 + tl.arange(0, BLOCK).to(tl.int64)
        alive = end < length  # an end followed by a token (the suffix itself ends at `length`)
        run = tl.zeros((BLOCK,), tl.int64)
        for i in tl.static_range(N_MAX):
            at = length - 1 - i
            want = tl.where(at >= 0, tl.load(h + tl.maximum(at, 0)), -2)
            before = end - 1 - i
            alive = alive & (tl.load(h + before, mask=alive & (before >= 0), other=-1) == want)
            run += alive.to(tl.int64)
        best = tl.maximum(best, tl.where(run >= N_MIN, run * width + end, -1))
    top = tl.max(best, axis=0)
    start = tl.maximum(top, 0) % width
    cap = tl.minimum(tl.maximum(tl.load(cap_ptr + row).to(tl.int64), 0), K)
    count = tl.where(top >= 0, tl.minimum(cap, length - start), 0)
    j = tl.arange(0, BLOCK_K)
    drafts = tl.load(h + start + j, mask=j < count, other=0)
    tl.store(out_ptr + row * stride_o + j, drafts, mask=j < K)
    tl.store(out_ptr + row * stride_o + K, count)


@triton_op("nanovllm_triton::ngram_lookup", mutates_args=())
def ngram_lookup_rows(history: torch.Tensor, lengths: torch.Tensor, caps: torch.Tensor, k: int, n_min: int,
                      n_max: int, block: int = 1024) -> torch.Tensor:
    """(rows, k + 1) int64: each row's drafts, then their count (see the op)."""
    rows, width = history.shape
    history = history if history.stride(-1) == 1 else history.contiguous()
    out = torch.empty(rows, k + 1, dtype=torch.int64, device=history.device)
    if rows:
        wrap_triton(_lookup_kernel)[(rows,)](
            history, lengths.contiguous(), caps.contiguous(), out, width, history.stride(0), out.stride(0),
            K=k, N_MIN=n_min, N_MAX=n_max, BLOCK=block, BLOCK_K=triton.next_power_of_2(k + 1), num_warps=4)
    return out


@register_impl("ngram_lookup", "triton", devices=core.devices())
def ngram_lookup(history: torch.Tensor, lengths: torch.Tensor, caps: torch.Tensor, k: int, n_min: int,
                 n_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = ngram_lookup_rows(history, lengths, caps, k, n_min, n_max)
    return out[:, :k], out[:, k]
