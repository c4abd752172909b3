"""Backend `triton` of `verify_layout` and `verify_accept`: a verify step's bookkeeping around its forward pass, one
launch each (the native ops are some twenty small tensor ops each, every one a launch inside the step's graph).

Both run one program per sequence over its k + 1 rows.
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
def _layout_kernel(ids_ptr, pos_ptr, lens_ptr, slot_ptr, nd_ptr, chained_ptr, assumed_ptr, bt_ptr, last_ptr, prop_ptr,
                   counts_ptr, stride_bt, stride_last, stride_prop, block_size, K1: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_PROPOSED: tl.constexpr):
    """Grid (b,): sequence s's rows moved, its slots recomputed, its inputs replaced when chained."""
    s = tl.program_id(0)
    chained = tl.load(chained_ptr + s) != 0
    shift = tl.where(chained, tl.load(last_ptr + s) - tl.load(assumed_ptr + s), 0)
    j = tl.arange(0, BLOCK)
    mask = j < K1
    rows = s * K1 + j
    pos = tl.load(pos_ptr + rows, mask=mask, other=0) + shift
    tl.store(pos_ptr + rows, pos, mask=mask)
    tl.store(lens_ptr + rows, tl.load(lens_ptr + rows, mask=mask, other=0) + shift, mask=mask)
    block = tl.load(bt_ptr + rows.to(tl.int64) * stride_bt + pos // block_size, mask=mask, other=0)
    tl.store(slot_ptr + rows, block * block_size + pos % block_size, mask=mask)
    if chained:
        ids = tl.where(j == 0, tl.load(last_ptr + stride_last + s), tl.load(ids_ptr + rows, mask=mask, other=0))
        if HAS_PROPOSED:
            proposed = tl.load(prop_ptr + s * stride_prop + j - 1, mask=mask & (j > 0), other=0)
            ids = tl.where(j > 0, proposed, ids)
            tl.store(nd_ptr + s, tl.load(counts_ptr + s))
        tl.store(ids_ptr + rows, ids, mask=mask)


@triton_op("nanovllm_triton::verify_layout", mutates_args=("ids", "positions", "seq_lens", "slot_mapping",
                                                           "num_drafts"))
def verify_layout_kernel(ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                         slot_mapping: torch.Tensor, num_drafts: torch.Tensor, chained: torch.Tensor,
                         assumed: torch.Tensor, block_tables: torch.Tensor, last: torch.Tensor,
                         proposed: torch.Tensor | None, proposed_counts: torch.Tensor | None, block_size: int) -> None:
    b, k1 = ids.shape
    if b:
        wrap_triton(_layout_kernel)[(b,)](
            ids, positions, seq_lens, slot_mapping, num_drafts, chained, assumed, block_tables, last, proposed,
            proposed_counts, block_tables.stride(0), last.stride(0), proposed.stride(0) if proposed is not None else 0,
            block_size, K1=k1, BLOCK=triton.next_power_of_2(k1), HAS_PROPOSED=proposed is not None, num_warps=1)


@triton.jit
def _accept_kernel(tgt_ptr, ids_ptr, nd_ptr, pos_ptr, limit_ptr, hist_ptr, res_ptr, lens_ptr, caps_ptr, stride_t,
                   stride_h, stride_res, width, K: tl.constexpr, BLOCK: tl.constexpr, HAS_HISTORY: tl.constexpr):
    """Grid (b,): sequence s's drafts kept (while each equals the target before it), the token after them, its
    result column, its kept tokens appended to its history, its length and cap."""
    s = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    rows = s * (K + 1) + j
    drafts = tl.load(ids_ptr + rows + 1, mask=j < K, other=0)
    targets = tl.load(tgt_ptr + s * stride_t + j, mask=j <= K, other=0)
    n = tl.load(nd_ptr + s)
    kept = tl.min(tl.where((j < K) & ((drafts != targets) | (j >= n)), j, K), axis=0)  # the first draft refused
    following = tl.sum(tl.where(j == kept, targets, 0), axis=0)
    tl.store(res_ptr + s, kept)
    tl.store(res_ptr + stride_res + s, following)
    tl.store(res_ptr + 2 * stride_res + s, n)
    tl.store(res_ptr + (3 + j) * stride_res + s, drafts, mask=j < K)
    length = tl.load(pos_ptr + s * (K + 1)) + 1
    if HAS_HISTORY:
        tokens = tl.where(j < kept, drafts, following)
        at = tl.minimum(length + j, width - 1)
        tl.store(hist_ptr + s * stride_h + at, tokens, mask=j <= K)
    length += kept + 1
    tl.store(lens_ptr + s, length)
    tl.store(caps_ptr + s, tl.load(limit_ptr + s) - length)


@triton_op("nanovllm_triton::verify_accept", mutates_args=("history",))
def verify_accept_kernel(targets: torch.Tensor, ids: torch.Tensor, num_drafts: torch.Tensor, positions: torch.Tensor,
                         limit: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    b, k1 = ids.shape
    result = ids.new_empty(3 + k1 - 1, b)
    lengths, caps = ids.new_empty(b), ids.new_empty(b)
    if b:
        wrap_triton(_accept_kernel)[(b,)](
            targets, ids, num_drafts, positions, limit, history, result, lengths, caps, targets.stride(0),
            history.stride(0) if history is not None else 0, result.stride(0),
            history.shape[1] if history is not None else 1, K=k1 - 1, BLOCK=triton.next_power_of_2(k1),
            HAS_HISTORY=history is not None, num_warps=1)
    return result, lengths, caps


register_impl("verify_layout", "triton", devices=core.devices())(verify_layout_kernel)
register_impl("verify_accept", "triton", devices=core.devices())(verify_accept_kernel)
