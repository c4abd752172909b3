"""Prompt logprobs: each prompt token's logprob (and rank, and the top alternatives) under the logits of the
position before it, taken from the hidden states of the eager steps that compute the prompt.

A sequence's `prompt_logprobs` list grows as its chunks are computed: None for the first token, then one
entry per token, {"token_logprob", "rank", "top": {id: logprob}}. Positions whose entries exist are skipped
when a chunk is recomputed (after a preemption); the block manager reuses cached K/V only for those
(Sequence.reusable_prefix_tokens), so no position is skipped before its entry exists.
"""

from __future__ import annotations

import torch

ROWS_PER_SLICE = 256  # logits are made for this many positions at a time: (slice, vocab) floats at most


@torch.inference_mode()
def record_prompt_logprobs(batch, hidden: torch.Tensor, compute_logits) -> None:
    """Append the entries that the step's `hidden` states (every new token of `batch`, in order) give."""
    offset = 0
    for item in batch:
        seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        if seq.prompt_logprobs is not None:
            # Position p predicts token p + 1: this chunk covers positions [start, start + n).
            lo, hi = max(start, len(seq.prompt_logprobs) - 1), min(start + n, seq.num_prompt_tokens - 1)
            for a in range(lo, hi, ROWS_PER_SLICE):
                b = min(a + ROWS_PER_SLICE, hi)
                seq.prompt_logprobs += _entries(compute_logits(hidden[offset + a - start:offset + b - start]),
                                                seq.token_ids[a + 1:b + 1], seq.params.prompt_logprobs)
        offset += n


def _entries(logits: torch.Tensor, targets: list[int], k: int) -> list[dict]:
    logp = logits.float().log_softmax(dim=-1)
    index = torch.tensor(targets, device=logp.device)[:, None]
    chosen = logp.gather(1, index)
    rank = (logp > chosen).sum(dim=-1) + 1
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], index[:, :0])
    return [{"token_logprob": lp, "rank": r, "top": dict(zip(ids, values))}
            for lp, r, ids, values in zip(chosen[:, 0].tolist(), rank.tolist(), top_i.tolist(), top_v.tolist())]
