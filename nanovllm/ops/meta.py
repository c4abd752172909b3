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
    host:          the same facts as numpy arrays on the host (seq_lens, cu_seqlens_q, block_tables,
                   num_blocks per request), for plan hooks; never read inside the forward pass
    plans:         backend state planned once per step outside any graph (e.g. FlashInfer wrappers)
    graph_batch:   the captured batch size when this step replays a CUDA graph, else None
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    pad_index: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    host: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)
    graph_batch: int | None = None

    @property
    def is_decode(self) -> bool:
        return self.max_seqlen_q == 1

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass(frozen=True)
class PlanContext:
    """Static facts a plan hook needs, fixed for the engine's life."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    device: torch.device
    max_num_seqs: int
    max_model_len: int
    windows: tuple[int, ...] = (0,)   # the distinct sliding windows of the model's layers (0 = full)
    softcap: float = 0.0
