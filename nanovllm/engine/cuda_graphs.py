"""CUDA graphs for decode steps: one graph per batch size (and block-table width), replayed with fresh inputs.

Every per-step input lives in one device buffer whose host twin is pinned memory, so a step costs a
single host-to-device copy. A batch is padded up to the next captured size; padded rows write their
K/V to the scratch block and read only it. Backends' plan hooks run before each replay, outside the
graph, with `meta.graph_batch` set so they can keep graph-safe state per batch size.
Small batches also get graphs over a narrower block table (`short_context_graphs` tokens), replayed while
every row's blocks fit: kernels sized from the table's width (the Triton decode attention's split count,
the native attention's padded keys) then fit the context instead of `max_model_len`.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch

from nanovllm.ops import AttentionMetadata

log = logging.getLogger("nanovllm")


SHORT_MAX_ROWS = 8  # narrow-table graphs for batches up to this size (where the split count depends on it)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    """Captured decode forward passes through sampling, for a set of batch sizes: a greedy graph per size
    (argmax LM head), and a sampled one whose temperature and noise are the `temperature` and `noise`
    buffers, which the caller fills before the replay (temperature-only sampling: no top-k/top-p/min-p)."""

    FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens")

    def __init__(self, runner, forward, capture_graphs: bool = True):
        # capture_graphs=False replays by running the forward pass eagerly on the same padded buffers:
        # the padding and buffer logic then runs (and is tested) on machines without a GPU.
        self.runner, self.forward, self.capture_graphs = runner, forward, capture_graphs
        self.sizes = graph_batch_sizes(runner.config.max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_blocks = -(-runner.config.max_model_len // runner.block_size)
        short = -(-runner.config.short_context_graphs // runner.block_size)
        self.short_blocks = short if 0 < short < self.max_blocks else None
        self.scratch_block = runner.num_blocks  # the extra block the KV cache keeps for padding
        width = len(self.FIELDS) * self.max_bs + self.max_bs * self.max_blocks
        # Two pinned staging buffers, used in turn: with async scheduling a step is filled while the copy
        # out of the previous step's buffer may still be queued on the GPU.
        self.hosts = [torch.zeros(width, dtype=torch.int64, pin_memory=runner.device.type == "cuda")
                      for _ in range(2)]
        self.turn = 0
        self.dev = torch.zeros(width, dtype=torch.int64, device=runner.device)
        self.arange = torch.arange(self.max_bs + 1, device=runner.device)
        zeros = torch.zeros(self.max_bs, device=runner.device)
        self.greedy = (zeros, zeros.long() - 1, zeros + 1, zeros, None)
        self.temperature = torch.zeros(self.max_bs, device=runner.device)
        self.noise = torch.ones(self.max_bs, runner.args.vocab_size, device=runner.device)
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}  # (batch size, table width, sampled)
        self.outputs: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def widths(self, b: int) -> list[int]:
        """The block-table widths captured for batch size b, narrowest first."""
        return [self.short_blocks, self.max_blocks] if self.short_blocks and b <= SHORT_MAX_ROWS else [self.max_blocks]

    def _views(self, buf, b: int, w: int):
        """The fields of a (b rows, w-block table) step in buf; the table's rows are w apart (contiguous)."""
        n = self.max_bs
        views = {name: buf[i * n:i * n + b] for i, name in enumerate(self.FIELDS)}
        start = len(self.FIELDS) * n
        views["block_tables"] = buf[start:start + b * w].reshape(b, w)
        return views

    def _meta(self, b: int, w: int, host: dict) -> AttentionMetadata:
        v = self._views(self.dev, b, w)
        return AttentionMetadata(
            positions=v["positions"], slot_mapping=v["slot_mapping"], seq_lens=v["seq_lens"],
            block_tables=v["block_tables"], cu_seqlens_q=self.arange[:b + 1], pad_index=self.arange[:b],
            max_seqlen_q=1, max_seqlen_k=w * self.runner.block_size, host=host, graph_batch=b)

    def _fill(self, b: int, w: int, rows: list[tuple[int, int, list[int]]]) -> dict:
        """rows: (token id, position, block table) per real request, each at most w blocks; pads up to b.
        Returns host arrays."""
        bs = self.runner.block_size
        self.turn ^= 1
        host = self.hosts[self.turn]
        v = self._views(host.numpy(), b, w)
        for name in self.FIELDS:
            v[name][:] = 0
        v["slot_mapping"][:] = self.scratch_block * bs
        v["seq_lens"][:] = 1
        v["block_tables"][:] = 0
        v["block_tables"][:, 0] = self.scratch_block
        num_blocks = np.ones(b, dtype=np.int64)
        if rows:  # vectorized: at 256 rows a per-row loop costs the host a millisecond a step
            n = len(rows)
            tokens, pos, tables = zip(*rows)
            pos = np.array(pos, dtype=np.int64)
            num_blocks[:n] = [len(t) for t in tables]
            used = np.arange(w) < num_blocks[:n, None]
            v["block_tables"][:n][used] = np.fromiter(itertools.chain.from_iterable(tables), np.int64,
                                                      int(num_blocks[:n].sum()))
            v["input_ids"][:n] = tokens
            v["positions"][:n] = pos
            v["slot_mapping"][:n] = v["block_tables"][np.arange(n), pos // bs] * bs + pos % bs
            v["seq_lens"][:n] = pos + 1
        # One copy, of the used prefix: the fields lie side by side, the block tables last.
        end = len(self.FIELDS) * self.max_bs + b * w
        self.dev[:end].copy_(host[:end], non_blocking=True)
        return dict(seq_lens=v["seq_lens"].copy(), cu_seqlens_q=np.arange(b + 1), block_tables=v["block_tables"],
                    num_blocks=num_blocks)

    def _run(self, b: int, meta: AttentionMetadata, sampled: bool):
        v = self._views(self.dev, b, meta.block_tables.shape[1])
        hidden = self.forward(v["input_ids"], v["positions"], meta)
        if sampled:
            return hidden, self.runner.model.sample(hidden, self.temperature[:b], None, None, None, self.noise[:b])
        return hidden, self.runner.model.sample(hidden, *[t[:b] if t is not None else None for t in self.greedy])

    @torch.inference_mode()
    def capture(self) -> float:
        t0 = time.perf_counter()
        if not self.capture_graphs:
            return 0.0
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            for w in reversed(self.widths(b)):
                host = self._fill(b, w, [])
                meta = self._meta(b, w, host)
                for plan in self.runner.plans:
                    plan(meta, self.runner.plan_context)
                for sampled in (False, True):
                    for _ in range(2):  # warm up: JIT, autotuning and lazy allocations happen outside capture
                        self._run(b, meta, sampled)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool):
                        self.outputs[b, w, sampled] = self._run(b, meta, sampled)
                    if self.pool is None:
                        self.pool = graph.pool()
                    self.graphs[b, w, sampled] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def fits(self, batch) -> bool:
        return len(batch) <= self.max_bs and all(item.num_new_tokens == 1 and item.completes for item in batch)

    def run(self, batch, prev_tokens: torch.Tensor | None = None,
            sampled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, tokens) of the real rows of a decode batch: greedy tokens, or with `sampled` tokens sampled
        at the temperatures and noise the caller put in `self.temperature` and `self.noise` (batch order).

        With `prev_tokens` (the device tokens of the step still in flight for the same rows), each row runs
        one position ahead and takes its input token from that tensor, without a round trip to the host."""
        n = len(batch)
        b = next(s for s in self.sizes if s >= n)
        ahead = int(prev_tokens is not None)
        rows = [(item.seq.token_ids[-1], item.seq.num_computed_tokens + ahead, item.seq.block_table)
                for item in batch]
        need = max((len(table) for *_, table in rows), default=1)
        w = next(w for w in self.widths(b) if w >= need)
        meta = self._meta(b, w, self._fill(b, w, rows))
        if prev_tokens is not None:  # input_ids are the first field of the device buffer
            self.dev[:n].copy_(prev_tokens[:n])
        for plan in self.runner.plans:
            plan(meta, self.runner.plan_context)
        if not self.capture_graphs:
            hidden, tokens = self._run(b, meta, sampled)
            return hidden[:n], tokens[:n]
        self.graphs[b, w, sampled].replay()
        hidden, tokens = self.outputs[b, w, sampled]
        return hidden[:n], tokens[:n]
