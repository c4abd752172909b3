"""The verify step: one forward pass that scores each sequence's last token and its drafts (k + 1 query rows
per sequence) against the paged KV cache, writing their K/V, and returns the logits of every row.

The rows of one sequence are a short prompt chunk at positions num_computed .. num_computed + n: the step's
metadata is marked `verify`, so the layers run the registry's `attention_verify` op (a query sees keys up to its
own position), whose backends capture in CUDA graphs; the GEMV-shaped sites run at k + 1 rows per sequence.

Eagerly each sequence has 1 + len(drafts) rows. `VerifyGraphs` captures the step per (batch size, k) with
k + 1 rows for every sequence (short draft lists padded; padding batch rows write to the scratch block).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import torch

from nanovllm.engine.cuda_graphs import graph_batch_sizes
from nanovllm.engine.sequence import Sequence
from nanovllm.ops import AttentionMetadata
from nanovllm.ops.meta import build_metadata

log = logging.getLogger("nanovllm")

PAD_TOKEN = 0  # input id of the padded draft rows (their logits are ignored)


def verify_inputs(seqs: list[Sequence], drafts: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """(input ids, query lengths, KV lengths after the step) of a verify step: per sequence its uncomputed
    last token, then its drafts."""
    ids = list(itertools.chain.from_iterable([seq.token_ids[-1], *d] for seq, d in zip(seqs, drafts)))
    q_lens = [1 + len(d) for d in drafts]
    return ids, q_lens, [seq.num_computed_tokens + q for seq, q in zip(seqs, q_lens)]


@torch.inference_mode()
def verify_logits_eager(runner, seqs: list[Sequence], drafts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, max_q, V), pad index) of an eager verify step: the logits of sequence i's row j at
    [i, j], rows past 1 + len(drafts[i]) zero."""
    ids, q_lens, seq_lens = verify_inputs(seqs, drafts)
    step = build_metadata([seq.block_table for seq in seqs], seq_lens, runner.block_size, q_lens=q_lens)
    meta = dataclasses.replace(step.to_device(runner.device), verify=True)
    for plan in runner.plans:
        plan(meta, runner.plan_context)
    input_ids = torch.tensor(ids, dtype=torch.int64).to(runner.device, non_blocking=True)
    logits = runner.model.compute_logits(runner.forward(input_ids, meta.positions, meta))
    padded = logits.new_zeros(len(seqs) * step.max_seqlen_q, logits.shape[1]).index_copy_(0, meta.pad_index, logits)
    return padded.view(len(seqs), step.max_seqlen_q, -1), meta.pad_index


class VerifyGraphs:
    """Captured verify steps: forward pass and LM head over b sequences of k + 1 rows each, for the decode
    graph batch sizes up to `max_batch_size`. Inputs live in one device buffer with a pinned host twin
    (one copy per step); the step is synchronous (its tokens are read before the next is launched), so a
    single buffer suffices. `capture_graphs=False` replays by running eagerly on the same padded buffers,
    which tests the padding on machines without a GPU."""

    def __init__(self, runner, k: int, max_batch_size: int, capture_graphs: bool = True):
        self.runner, self.k, self.capture_graphs = runner, k, capture_graphs
        self.rows_per_seq = k + 1
        if self.rows_per_seq > runner.block_size:
            raise ValueError(f"num_speculative_tokens={k} needs k + 1 <= kvcache_block_size={runner.block_size} "
                             "for the verify graphs' padding rows")
        self.sizes = [b for b in graph_batch_sizes(runner.config.max_num_seqs) if b <= max_batch_size]
        self.max_bs = self.sizes[-1]
        self.max_blocks = -(-runner.config.max_model_len // runner.block_size)
        self.scratch_block = runner.num_blocks
        n = self.max_bs * self.rows_per_seq
        self.layout = {"input_ids": n, "positions": n, "slot_mapping": n, "seq_lens": self.max_bs,
                       "block_tables": self.max_bs * self.max_blocks}
        size = sum(self.layout.values())
        cuda = runner.device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=cuda and capture_graphs)
        self.inputs = torch.zeros(size, dtype=torch.int64, device=runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.fixed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # b -> (cu_seqlens_q, pad_index)
        self.ready: list[int] = []
        self.pool = None

    def views(self, buf, b: int) -> dict:
        out, start = {}, 0
        for name, size in self.layout.items():
            used = b * self.max_blocks if name == "block_tables" else (
                b if name == "seq_lens" else b * self.rows_per_seq)
            out[name] = buf[start:start + used]
            start += size
        out["block_tables"] = out["block_tables"].reshape(b, self.max_blocks)
        return out

    def size_for(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def fits(self, seqs: list[Sequence], drafts: list[list[int]]) -> bool:
        """Every sequence has blocks for k + 1 rows within max_model_len, and a batch size holds them."""
        if self.size_for(len(seqs)) is None:
            return False
        limit = self.runner.config.max_model_len
        return all(seq.num_tokens + self.k <= min(limit, len(seq.block_table) * self.runner.block_size)
                   for seq in seqs)

    def _fill(self, b: int, seqs: list[Sequence], drafts: list[list[int]]) -> dict:
        """Fills the host buffer for b rows (the real sequences, then padding rows on the scratch block)."""
        k1, n = self.rows_per_seq, len(seqs)
        v = self.views(self.host.numpy(), b)
        padded = [d + [PAD_TOKEN] * (self.k - len(d)) for d in drafts]
        ids, _, seq_lens = verify_inputs(seqs, padded)
        v["input_ids"][:] = PAD_TOKEN
        v["input_ids"][:n * k1] = ids
        tables = [seq.block_table for seq in seqs] + [[self.scratch_block]] * (b - n)
        step = build_metadata(tables, seq_lens + [k1] * (b - n), self.runner.block_size, q_lens=[k1] * b,
                              width=self.max_blocks, out=v)
        return step.host

    def _meta(self, b: int, host: dict) -> AttentionMetadata:
        v = self.views(self.inputs, b)
        cu, pad = self.fixed[b]
        return AttentionMetadata(positions=v["positions"], slot_mapping=v["slot_mapping"], seq_lens=v["seq_lens"],
                                 block_tables=v["block_tables"], cu_seqlens_q=cu, pad_index=pad,
                                 max_seqlen_q=self.rows_per_seq,
                                 max_seqlen_k=self.max_blocks * self.runner.block_size, host=host, graph_batch=b,
                                 verify=True)

    def _upload(self, b: int) -> None:
        end = sum(self.layout.values())
        self.inputs[:end].copy_(self.host[:end], non_blocking=True)

    def _run(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        v = self.views(self.inputs, b)
        return self.runner.model.compute_logits(self.runner.forward(v["input_ids"], v["positions"], meta))

    def _prepare(self, b: int) -> None:
        if b not in self.fixed:
            dev = self.runner.device
            k1 = self.rows_per_seq
            self.fixed[b] = (torch.arange(0, b * k1 + 1, k1, device=dev), torch.arange(b * k1, device=dev))

    @torch.inference_mode()
    def capture(self, sizes=None) -> float:
        t0 = time.perf_counter()
        for b in sorted(set(sizes or self.sizes) - set(self.ready), reverse=True):
            self._prepare(b)
            if self.capture_graphs:
                meta = self._meta(b, self._fill(b, [], []))
                self._upload(b)
                for plan in self.runner.plans:
                    plan(meta, self.runner.plan_context)
                for _ in range(2):
                    self._run(b, meta)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[b] = self._run(b, meta)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[b] = graph
            self.ready = sorted({*self.ready, b})
        return time.perf_counter() - t0

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], drafts: list[list[int]]) -> torch.Tensor:
        """Logits (n, k + 1, V) of the real sequences (rows past a sequence's drafts are padding)."""
        n = len(seqs)
        b = self.size_for(n)
        if b not in self.ready:
            log.info("captured the verify graph of batch size %d (k=%d) in %.2f s", b, self.k, self.capture([b]))
        host = self._fill(b, seqs, drafts)
        meta = self._meta(b, host)
        self._upload(b)
        for plan in self.runner.plans:
            plan(meta, self.runner.plan_context)
        if self.capture_graphs:
            self.graphs[b].replay()
            logits = self.outputs[b]
        else:
            logits = self._run(b, meta)
        return logits[:n * self.rows_per_seq].view(n, self.rows_per_seq, -1)


