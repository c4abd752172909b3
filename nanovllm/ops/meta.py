"""Per-step attention metadata, built once per step on the host and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Tokens of a step are packed: request i owns q rows cu_seqlens_q[i]:cu_seqlens_q[i+1].

    positions:     (N,) absolute position of each new token (its slot in its request's KV)
    slot_mapping:  (N,) flat KV-cache slot each new token's K/V is written to
    seq_lens:      (B,) KV length of each request after this step
    block_tables:  (B, max_blocks) KV-cache block ids, padded with 0 (masked by position)
    pad_index:     (N,) row of each token in a (B * max_seqlen_q) padded layout
    max_seqlen_q:  longest new-token run in the step; 1 for a pure decode step
    plans:         backend state planned once per step outside any graph (e.g. FlashInfer wrappers)
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    pad_index: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    plans: dict = field(default_factory=dict)

    @property
    def is_decode(self) -> bool:
        return self.max_seqlen_q == 1

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
