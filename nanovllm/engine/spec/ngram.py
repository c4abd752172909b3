"""Prompt lookup: the suffix n-gram of a sequence found earlier in its own tokens proposes what followed it.

Vectorised over the sequence with numpy, one comparison per n-gram length: O(length x n) host work per row,
small next to a verify step."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nanovllm.engine.sequence import Sequence
from nanovllm.engine.spec.proposer import Proposer, register_proposer


def lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram of
    `tokens` (n from n_max down to n_min); [] when no suffix of those lengths occurred before."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n:]
        windows = sliding_window_view(tokens[:size - 1], n)  # starts 0 .. size - n - 1: each has a follower
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


@register_proposer("ngram")
class NgramProposer(Proposer):
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[list[int]]:
        c = self.config
        return [lookup(np.asarray(seq.token_ids, dtype=np.int64), k, c.prompt_lookup_min, c.prompt_lookup_max)
                if k > 0 else [] for seq, k in zip(seqs, max_tokens)]
