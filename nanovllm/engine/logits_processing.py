"""Per-request changes to a step's logits before sampling, batched over the step's rows as device tensors:
min_tokens (the request's stop token ids masked until it has that many tokens), logit_bias, and the
presence, frequency (OpenAI) and repetition (vLLM / Hugging Face) penalties.

Everything is built from the host's token lists with one upload per tensor (pinned, non-blocking) and
applied with whole-tensor operations: no loop over the vocabulary, no host sync. A row that asks for none
of these gets neutral values (bias 0, penalties 0 and 1), which leave its logits bit for bit as they were.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch


def adjusts_logits(seq) -> bool:
    """Whether the next token of `seq` (a Sequence) is sampled from changed logits."""
    p = seq.params
    return p.penalized or bool(p.logit_bias) or (
        p.min_tokens > seq.num_completion_tokens and bool(seq.min_tokens_stop_ids))


def needs_host_state(seq) -> bool:
    """Whether sampling the next token of `seq` reads the host's view of its tokens so far: logits adjusted from
    its token list (adjusts_logits) or masked by its grammar's state."""
    return adjusts_logits(seq) or seq.params.structured is not None


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor | None,
                    presence: torch.Tensor | None, frequency: torch.Tensor | None,
                    repetition: torch.Tensor | None) -> torch.Tensor:
    """Penalized float32 logits (rows, vocab).

    output_counts (rows, vocab): occurrences of each token in the row's output so far; prompt_mask (rows, vocab,
    bool): the token occurs in the row's prompt (needed with `repetition` only); presence, frequency,
    repetition (rows,): per-row penalties, None when no row uses that one (0, 0 and 1 are neutral).
    Repetition (over prompt and output tokens) divides positive logits and multiplies negative ones; then
    frequency * count and presence * [count > 0] are subtracted.
    """
    logits = logits.float()
    output_mask = output_counts > 0
    if repetition is not None:
        seen = output_mask if prompt_mask is None else output_mask | prompt_mask
        scale = torch.where(seen, repetition.unsqueeze(1), torch.ones_like(logits))
        logits = torch.where(logits > 0, logits / scale, logits * scale)
    if frequency is not None:
        logits = logits - frequency.unsqueeze(1) * output_counts
    if presence is not None:
        logits = logits - presence.unsqueeze(1) * output_mask
    return logits


@dataclass
class LogitsAdjustment:
    """The adjustments of one step's sampled rows (build it with `of`; None when no row needs any)."""

    # Entries of the flattened (rows, vocab) logits, row * vocab + token id:
    banned: torch.Tensor | None                          # set to -inf (min_tokens)
    bias: tuple[torch.Tensor, torch.Tensor] | None       # (entries, biases) added (logit_bias)
    # The penalties, over the penalized rows only (`penalized`: their indices in the step), so a step with few
    # penalized rows builds small (rows, vocab) tensors.
    penalized: torch.Tensor | None
    output_counts: torch.Tensor | None
    prompt_mask: torch.Tensor | None
    presence: torch.Tensor | None
    frequency: torch.Tensor | None
    repetition: torch.Tensor | None

    @classmethod
    def of(cls, seqs, vocab_size: int, device: torch.device) -> LogitsAdjustment | None:
        if not any(adjusts_logits(s) for s in seqs):
            return None
        pinned = device.type == "cuda"

        def upload(values, dtype) -> torch.Tensor:
            return torch.as_tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True) if pinned \
                else torch.as_tensor(values, dtype=dtype, device=device)

        def column(values, off) -> torch.Tensor | None:
            return None if all(v == off for v in values) else upload(values, torch.float32)

        banned = bias = None
        stop = [sorted(s.min_tokens_stop_ids) if s.params.min_tokens > s.num_completion_tokens else [] for s in seqs]
        if any(stop):
            banned = upload(_entries(stop, vocab_size), torch.int64)
        biases = [(s.params.logit_bias or {}) for s in seqs]
        if any(biases):
            bias = (upload(_entries([list(b) for b in biases], vocab_size), torch.int64),
                    upload([v for b in biases for v in b.values()], torch.float32))
        index = [i for i, s in enumerate(seqs) if s.params.penalized]
        penalized = output_counts = prompt_mask = presence = frequency = repetition = None
        if index:
            params = [seqs[i].params for i in index]
            penalized = upload(index, torch.int64)
            presence = column([p.presence_penalty for p in params], 0.0)
            frequency = column([p.frequency_penalty for p in params], 0.0)
            repetition = column([p.repetition_penalty for p in params], 1.0)
            output_counts = _token_counts([seqs[i].completion_token_ids for i in index], vocab_size, upload, device)
            if repetition is not None:
                prompt = [seqs[i].token_ids[:seqs[i].num_prompt_tokens] if p.repetition_penalty != 1 else []
                          for i, p in zip(index, params)]
                prompt_mask = _token_counts(prompt, vocab_size, upload, device) > 0
        return cls(banned, bias, penalized, output_counts, prompt_mask, presence, frequency, repetition)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The adjusted logits (float32, a new tensor)."""
        logits = logits.float().clone(memory_format=torch.contiguous_format)  # flat views below
        if self.banned is not None:
            logits.view(-1).index_fill_(0, self.banned, float("-inf"))
        if self.bias is not None:
            logits.view(-1).index_add_(0, *self.bias)
        if self.penalized is not None:
            rows = apply_penalties(logits.index_select(0, self.penalized), self.output_counts, self.prompt_mask,
                                   self.presence, self.frequency, self.repetition)
            logits.index_copy_(0, self.penalized, rows)
        return logits


def _entries(per_row: list[list[int]], vocab_size: int) -> np.ndarray:
    """Flat indices row * vocab + token id of each row's token ids, row by row."""
    lengths = [len(x) for x in per_row]
    flat = np.repeat(np.arange(len(per_row), dtype=np.int64) * vocab_size, lengths)
    flat += np.fromiter(itertools.chain.from_iterable(per_row), np.int64, sum(lengths))
    return flat


def _token_counts(per_row: list[list[int]], vocab_size: int, upload, device: torch.device) -> torch.Tensor:
    """(rows, vocab) float32: how often each token occurs in each row's list."""
    counts = torch.zeros(len(per_row), vocab_size, dtype=torch.float32, device=device)
    flat = _entries(per_row, vocab_size)
    if flat.size:
        counts.view(-1).index_add_(0, upload(flat, torch.int64), torch.ones(flat.size, device=device))
    return counts
