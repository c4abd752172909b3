"""Prompt lookup: the suffix n-gram of a sequence found earlier in its own tokens proposes what followed it.

On the host each sequence keeps an index of its n-grams (one dict per length, n-gram -> where its latest
occurrence ends), extended with the tokens appended since its last step: a step's host work is a few dict
operations, whatever the sequence's length (a scan of the whole sequence costs a long prompt hundreds of µs a
step, on the critical path of a synchronous speculative step).

Inside pipelined verify steps the same lookup runs on the device (the op `ngram_lookup`, resolved with the model's
ops), over a copy of each sequence's tokens that the verify graph extends with the tokens it keeps: the drafts
of the next step then follow the tokens actually kept, which the host learns only a step later."""

from __future__ import annotations

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.engine.spec.proposer import Proposer, register_proposer


class NgramIndex:
    """The n-grams of one token list (lengths n_min..n_max) that have a token after them, each mapped to the
    end of its latest such occurrence (the position of that following token). Tokens are only ever appended."""

    def __init__(self, n_min: int, n_max: int):
        self.lengths = range(n_min, n_max + 1)
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.lengths}
        self.indexed = 0  # every n-gram ending at or before this position is in `ends`

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram of `tokens`
        (which extends the list of the call before); [] when no suffix n-gram occurred before."""
        final = len(tokens)
        for end in range(self.indexed + 1, final):  # the n-grams followed by tokens[end], the newest last
            for n in self.lengths:
                if end >= n:
                    self.ends[n][tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, final - 1)
        for n in reversed(self.lengths):
            if n < final:
                end = self.ends[n].get(tuple(tokens[final - n:]))
                if end is not None:
                    return tokens[end:end + k]
        return []


@register_proposer("ngram")
class NgramProposer(Proposer):
    cheap = True
    on_device = True

    def __init__(self, config, engine):
        super().__init__(config, engine)
        self.indexes: dict[int, NgramIndex] = {}  # seq_id -> its index, from its first drafting step

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[list[int]]:
        return [self._index(seq).lookup(seq.token_ids, k) if k > 0 else [] for seq, k in zip(seqs, max_tokens)]

    def propose_on_device(self, history: torch.Tensor, lengths: torch.Tensor,
                          caps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return self.engine.runner.model.ops.ngram_lookup(history, lengths, caps, c.num_speculative_tokens,
                                                         c.prompt_lookup_min, c.prompt_lookup_max)

    def _index(self, seq: Sequence) -> NgramIndex:
        index = self.indexes.get(seq.seq_id)
        if index is None:
            c = self.config
            index = self.indexes[seq.seq_id] = NgramIndex(c.prompt_lookup_min, c.prompt_lookup_max)
        return index

    def release(self, seq: Sequence) -> None:
        self.indexes.pop(seq.seq_id, None)

    def close(self) -> None:
        self.indexes.clear()
