"""Native references of the verify step's bookkeeping ops: the work a captured verify step does around its
forward pass (nanovllm/engine/spec/verify.py), some thirty small tensor ops each, which a backend may do in
one kernel.

- `verify_layout`: before the forward pass, lays each chained sequence's rows out as the step before actually
  left them.
- `verify_accept`: after it, greedy acceptance, the step's result rows, and each sequence's kept tokens appended
  to its device copy of its tokens.
- `ngram_lookup`: the n-gram proposer's lookup on those copies, for the next step's drafts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.ops.meta import kv_slots
from nanovllm.ops.registry import define_op


def greedy_accept(targets: torch.Tensor, drafts: torch.Tensor,
                  num_drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafts kept (B,), the token after them (B,)) of greedy rows: targets (B, k + 1) the argmax of each
    row's logits, drafts (B, k), num_drafts (B,) (entries past it ignored). A draft is kept while it and every
    draft before it equal the target's argmax at the row before."""
    k = drafts.shape[1]
    valid = torch.arange(k, device=drafts.device).unsqueeze(0) < num_drafts.unsqueeze(1)
    kept = ((drafts == targets[:, :k]) & valid).long().cumprod(dim=1).sum(dim=1)
    return kept, targets.gather(1, kept.unsqueeze(1)).squeeze(1)


@define_op("verify_layout")
def verify_layout(ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
                  num_drafts: torch.Tensor, chained: torch.Tensor, assumed: torch.Tensor, block_tables: torch.Tensor,
                  last: torch.Tensor, proposed: torch.Tensor | None, proposed_counts: torch.Tensor | None,
                  block_size: int) -> None:
    """Lay the chained sequences' rows out in place, as the step before left them: ids (b, k + 1) the inputs;
    positions, seq_lens, slot_mapping (b * (k + 1),) and block_tables (b * (k + 1), blocks) the rows' metadata;
    num_drafts, chained, assumed (b,). A chained sequence's rows move by the drafts the step before kept
    (last[0]) less those `assumed`, its first input becomes that step's next token (last[1]), and with
    `proposed` its drafts and their count become proposed[i, :] and proposed_counts[i]. Every row's slot is
    recomputed from its position."""
    b, k1 = ids.shape
    is_chained = chained.bool()
    shift = torch.where(is_chained, last[0, :b] - assumed, 0)[:, None].expand(b, k1).reshape(-1)
    positions.add_(shift)
    seq_lens.add_(shift)
    slot_mapping.copy_(kv_slots(block_tables, torch.arange(b * k1, device=ids.device), positions, block_size))
    ids[:, 0].copy_(torch.where(is_chained, last[1, :b], ids[:, 0]))
    if proposed is not None:
        ids[:, 1:].copy_(torch.where(is_chained[:, None], proposed, ids[:, 1:]))
        num_drafts.copy_(torch.where(is_chained, proposed_counts, num_drafts))


@define_op("verify_accept")
def verify_accept(targets: torch.Tensor, ids: torch.Tensor, num_drafts: torch.Tensor, positions: torch.Tensor,
                  limit: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance of a verify step: targets (b, k + 1) the argmax of each row's logits, ids (b, k + 1) the
    inputs (the last token, then the drafts, num_drafts[i] of them real), positions the rows' positions, limit
    (b,) the most tokens each sequence may reach. Returns (result (3 + k, b): drafts kept, the token after them,
    the number of drafts and the drafts; lengths (b,): each sequence's tokens after the step; caps (b,): limit
    less lengths). With `history` (b, S), each sequence's tokens, the tokens it keeps are written there in place
    (its kept drafts, then the next token, from position lengths - kept - 1)."""
    b, k1 = ids.shape
    drafts = ids[:, 1:]
    kept, following = greedy_accept(targets, drafts, num_drafts)
    lengths = positions.view(b, k1)[:, 0] + 1  # the tokens before the step, its first input the last
    if history is not None:
        j = torch.arange(k1, device=ids.device)
        tokens = torch.where(j < kept[:, None], ids.roll(-1, dims=1), following[:, None])  # drafts[j], then the next
        history.scatter_(1, (lengths[:, None] + j).clamp(max=history.shape[1] - 1), tokens)
    lengths = lengths + kept + 1
    return torch.cat((torch.stack((kept, following, num_drafts)), drafts.T)), lengths, limit - lengths


@define_op("ngram_lookup")
def ngram_lookup(history: torch.Tensor, lengths: torch.Tensor, caps: torch.Tensor, k: int, n_min: int,
                 n_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt lookup per row of token ids (CUDA-graph safe): row i's tokens are history[i, :lengths[i]] (b, S).
    Returns (drafts (b, k), counts (b,)): row i proposes drafts[i, :counts[i]] (0 after them), at most caps[i]
    (clamped to [0, k]) tokens, those after the latest earlier occurrence of its longest suffix n-gram
    (n_min <= n <= n_max), or none (the n-gram proposer's NgramIndex.lookup, for every row at once)."""
    b, width = history.shape
    back = lengths[:, None] - 1 - torch.arange(n_max, device=history.device)  # the suffix, newest token first
    suffix = torch.where(back >= 0, history.gather(1, back.clamp(min=0)), -2)
    padded = F.pad(history, (n_max, 0), value=-1)  # padded[:, n_max + p] = history[:, p]
    # run[:, e]: how many of the suffix's tokens (at most n_max) the tokens before position e repeat
    alive = torch.ones_like(history, dtype=torch.bool)
    run = torch.zeros_like(history)
    for i in range(n_max):
        alive &= padded[:, n_max - 1 - i:n_max - 1 - i + width] == suffix[:, i:i + 1]
        run += alive
    ends = torch.arange(width, device=history.device)
    # the longest run, then the latest, among those followed by a token (e < length; e = length is the suffix)
    score = torch.where((run >= n_min) & (ends < lengths[:, None]), run * width + ends, -1).amax(dim=1)
    start = score.remainder(width)
    counts = torch.where(score >= 0, torch.minimum(caps.clamp(0, k), lengths - start), 0)
    j = torch.arange(k, device=history.device)
    drafts = history.gather(1, (start[:, None] + j).clamp(max=width - 1))
    return torch.where(j < counts[:, None], drafts, 0), counts
