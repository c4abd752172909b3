"""Per-step attention metadata, built once per step on the host and shared by every layer."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
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
    verify:        a speculative verify step, decode-shaped: each query row (a sequence's last token or one of
                   its drafts) is a request of its own, and the rows of one sequence share its blocks, so a row
                   attends to the K/V the rows before it write in this step. Every row's K/V must be written
                   before any row attends: a backend that fuses the K/V write into its attention kernel splits it
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
    verify: bool = False

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


def kv_slots(block_tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Flat KV-cache slot of token `positions[i]` of request `rows[i]`: offset `position % block_size` in block
    `block_tables[row, position // block_size]` (numpy or torch arrays alike)."""
    return block_tables[rows, positions // block_size] * block_size + positions % block_size


def verify_requests(block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int],
                    q_lens: Sequence[int]) -> tuple[list, list[int]]:
    """A verify step's rows as one-query requests (AttentionMetadata.verify): for the last q_lens[i] of request
    i's seq_lens[i] tokens, each in order, request i's block table and the KV length that row sees (up to itself).
    Returns (block tables, seq_lens) per row, for build_metadata."""
    rows = [(table, n - q + 1 + j) for table, n, q in zip(block_tables, seq_lens, q_lens) for j in range(q)]
    return [table for table, _ in rows], [n for _, n in rows]


@dataclass
class HostMetadata:
    """A step's attention metadata as host (numpy, int64) arrays; the fields mean what AttentionMetadata's do.
    `num_blocks` is the number of used block-table entries per request."""

    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    cu_seqlens_q: np.ndarray
    pad_index: np.ndarray
    block_tables: np.ndarray
    num_blocks: np.ndarray
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def host(self) -> dict:
        """The arrays plan hooks read (AttentionMetadata.host)."""
        return dict(seq_lens=self.seq_lens, cu_seqlens_q=self.cu_seqlens_q, block_tables=self.block_tables,
                    num_blocks=self.num_blocks)

    def to_device(self, device, graph_batch: int | None = None) -> AttentionMetadata:
        def dev(x):
            return torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True)

        return AttentionMetadata(
            positions=dev(self.positions), slot_mapping=dev(self.slot_mapping), seq_lens=dev(self.seq_lens),
            block_tables=dev(self.block_tables), cu_seqlens_q=dev(self.cu_seqlens_q),
            pad_index=dev(self.pad_index), max_seqlen_q=self.max_seqlen_q, max_seqlen_k=self.max_seqlen_k,
            host=self.host, graph_batch=graph_batch)


def build_metadata(block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int], block_size: int, *,
                   q_lens: Sequence[int] | None = None, rows: int | None = None, width: int | None = None,
                   scratch_block: int | None = None, out: dict[str, np.ndarray] | None = None) -> HostMetadata:
    """The one place a step's attention metadata is computed from its requests' block tables.

    Request i has `seq_lens[i]` tokens of KV after the step, of which the last `q_lens[i]` are new (default 1
    each: a decode step); its KV lives in blocks `block_tables[i]` (a list, or a row of an array), which must
    hold `seq_lens[i]` tokens. New tokens are packed request after request; a token at position p writes its
    K/V to slot `block_tables[i][p // block_size] * block_size + p % block_size`.

    rows:          pad the step to this many requests (a CUDA graph's batch size): each padding request decodes
                   one token at position 0 of `scratch_block`, whose table is `[scratch_block, 0, ...]`
    width:         block-table columns (default: the longest table); unused entries are 0, masked by seq_lens
    out:           arrays to write positions, slot_mapping, seq_lens (rows,) and block_tables (rows, width)
                   into (a pinned staging buffer's views); the result's block_tables is then out's
    """
    n = len(block_tables)
    rows = n if rows is None else rows
    if rows < n:
        raise ValueError(f"cannot pad {n} requests to {rows} rows")
    if rows > n and scratch_block is None:
        raise ValueError("padding rows need a scratch_block to write their K/V to")
    if len(seq_lens) != n or (q_lens is not None and len(q_lens) != n):
        raise ValueError(f"{n} block tables but {len(seq_lens)} seq_lens"
                         + ("" if q_lens is None else f" and {len(q_lens)} q_lens"))
    lens = [len(table) for table in block_tables]
    longest = max(lens, default=1)
    width = longest if width is None else width
    num_blocks = np.ones(rows, dtype=np.int64)
    num_blocks[:n] = lens
    seq = np.ones(rows, dtype=np.int64)
    seq[:n] = seq_lens
    if longest > width:
        raise ValueError(f"request {lens.index(longest)}: {longest} blocks do not fit a {width}-column block table")
    if (seq > num_blocks * block_size).any():
        i = int(np.flatnonzero(seq > num_blocks * block_size)[0])
        raise ValueError(f"request {i}: {num_blocks[i]} blocks of {block_size} tokens cannot hold its {seq[i]} tokens")

    tables = out["block_tables"] if out is not None else np.empty((rows, width), dtype=np.int64)
    tables[:] = 0
    if rows > n:
        tables[n:, 0] = scratch_block
    if n:
        used = np.arange(width) < num_blocks[:n, None]
        tables[:n][used] = np.fromiter(itertools.chain.from_iterable(block_tables), np.int64,
                                       int(num_blocks[:n].sum()))
    if q_lens is None:  # one token per request: no ragged packing (the decode graphs' per-step path)
        req = pad_index = np.arange(rows)
        cu, max_q = np.arange(rows + 1), 1
        positions = seq - 1
    else:
        q = np.ones(rows, dtype=np.int64)
        q[:n] = q_lens
        if (q[:n] < 1).any() or (q[:n] > seq[:n]).any():
            i = int(np.flatnonzero((q[:n] < 1) | (q[:n] > seq[:n]))[0])
            raise ValueError(f"request {i}: {q[i]} new tokens of {seq[i]} (need 1 <= new <= seq_len)")
        cu = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:])
        req = np.repeat(np.arange(rows), q)
        offset = np.arange(cu[-1]) - cu[req]
        max_q = int(q.max(initial=1))
        positions = (seq - q)[req] + offset
        pad_index = req * max_q + offset
    slots = kv_slots(tables, req, positions, block_size)
    if out is not None:
        out["positions"][:] = positions
        out["slot_mapping"][:] = slots
        out["seq_lens"][:] = seq
    return HostMetadata(positions=positions, slot_mapping=slots, seq_lens=seq, cu_seqlens_q=cu,
                        pad_index=pad_index, block_tables=tables, num_blocks=num_blocks,
                        max_seqlen_q=max_q, max_seqlen_k=int(seq.max(initial=1)))
