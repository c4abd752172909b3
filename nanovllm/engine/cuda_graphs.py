"""CUDA graphs for decode steps: one graph per batch size (and block-table width), replayed with fresh inputs.

Every per-step input lives in one device buffer whose host twin is pinned memory, so a step costs a
single host-to-device copy. There are two such pairs, used in turn, and a graph per pair: while one step's
graph reads its buffer, the next step's inputs are copied into the other on a side stream, and the graph
writes its tokens straight into the other buffer's input ids, where a step launched ahead finds them. The
tokens go to the host on another side stream, so back-to-back steps wait for no copy between replays.
A batch is padded up to the next captured size; padded rows write their K/V to the scratch block and read
only it. Backends' plan hooks run before each replay, outside the graph, with `meta.graph_batch` set so they
can keep graph-safe state per batch size.
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
        # Two pinned staging buffers and their device twins, used in turn (`turn` is the last step's): with async
        # scheduling a step is filled and copied in while the step before still runs on the other pair.
        cuda = runner.device.type == "cuda"
        self.hosts = [torch.zeros(width, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self.inputs = [torch.zeros(width, dtype=torch.int64, device=runner.device) for _ in range(2)]
        self.turn = 0
        streams = cuda and capture_graphs
        self.upload = torch.cuda.Stream(runner.device) if streams else None
        self.download = torch.cuda.Stream(runner.device) if streams else None
        self.main = None  # the stream of the last replay
        # Per buffer: its last reader graph is done (released), its inputs are in (uploaded), the tokens a graph
        # left in it are on the host (fetched).
        self.released, self.uploaded, self.fetched = ([torch.cuda.Event() for _ in range(2)] if streams else None
                                                      for _ in range(3))
        self.arange = torch.arange(self.max_bs + 1, device=runner.device)
        zeros = torch.zeros(self.max_bs, device=runner.device)
        self.greedy = (zeros, zeros.long() - 1, zeros + 1, zeros, None)
        self.temperature = torch.zeros(self.max_bs, device=runner.device)
        self.noise = torch.ones(self.max_bs, runner.args.vocab_size, device=runner.device)
        # keyed (batch size, table width, sampled, buffer)
        self.graphs: dict[tuple[int, int, bool, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, bool, int], tuple[torch.Tensor, torch.Tensor]] = {}
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

    def _meta(self, b: int, w: int, host: dict, t: int) -> AttentionMetadata:
        v = self._views(self.inputs[t], b, w)
        return AttentionMetadata(
            positions=v["positions"], slot_mapping=v["slot_mapping"], seq_lens=v["seq_lens"],
            block_tables=v["block_tables"], cu_seqlens_q=self.arange[:b + 1], pad_index=self.arange[:b],
            max_seqlen_q=1, max_seqlen_k=w * self.runner.block_size, host=host, graph_batch=b)

    def _fill(self, b: int, w: int, rows: list[tuple[int, int, list[int]]], t: int) -> dict:
        """rows: (token id, position, block table) per real request, each at most w blocks; pads up to b.
        Fills host buffer t and returns its arrays."""
        bs = self.runner.block_size
        v = self._views(self.hosts[t].numpy(), b, w)
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
            num_blocks[:n] = [len(table) for table in tables]
            used = np.arange(w) < num_blocks[:n, None]
            v["block_tables"][:n][used] = np.fromiter(itertools.chain.from_iterable(tables), np.int64,
                                                      int(num_blocks[:n].sum()))
            v["input_ids"][:n] = tokens
            v["positions"][:n] = pos
            v["slot_mapping"][:n] = v["block_tables"][np.arange(n), pos // bs] * bs + pos % bs
            v["seq_lens"][:n] = pos + 1
        return dict(seq_lens=v["seq_lens"].copy(), cu_seqlens_q=np.arange(b + 1), block_tables=v["block_tables"],
                    num_blocks=num_blocks)

    def _upload(self, t: int, b: int, w: int, skip_ids: bool = False) -> None:
        """Copies host buffer t into its device twin, one copy of the used prefix (the fields lie side by side,
        the block tables last); with `skip_ids`, all but the input ids. On the current stream."""
        start, end = self.max_bs if skip_ids else 0, len(self.FIELDS) * self.max_bs + b * w
        self.inputs[t][start:end].copy_(self.hosts[t][start:end], non_blocking=True)

    def _run(self, b: int, meta: AttentionMetadata, sampled: bool, t: int):
        v = self._views(self.inputs[t], b, meta.block_tables.shape[1])
        hidden = self.forward(v["input_ids"], v["positions"], meta)
        if sampled:
            tokens = self.runner.model.sample(hidden, self.temperature[:b], None, None, None, self.noise[:b])
        else:
            tokens = self.runner.model.sample(hidden, *[x[:b] if x is not None else None for x in self.greedy])
        following = self.inputs[1 - t][:b]  # the next step's input ids, for a step launched ahead on these tokens
        following.copy_(tokens)
        return hidden, following

    @torch.inference_mode()
    def capture(self) -> float:
        t0 = time.perf_counter()
        if not self.capture_graphs:
            return 0.0
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            for w, t in itertools.product(reversed(self.widths(b)), (0, 1)):
                meta = self._meta(b, w, self._fill(b, w, [], t), t)
                self._upload(t, b, w)
                for plan in self.runner.plans:
                    plan(meta, self.runner.plan_context)
                for sampled in (False, True):
                    for _ in range(2):  # warm up: JIT, autotuning and lazy allocations happen outside capture
                        self._run(b, meta, sampled, t)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool):
                        self.outputs[b, w, sampled, t] = self._run(b, meta, sampled, t)
                    if self.pool is None:
                        self.pool = graph.pool()
                    self.graphs[b, w, sampled, t] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def fits(self, batch) -> bool:
        return len(batch) <= self.max_bs and all(item.num_new_tokens == 1 and item.completes for item in batch)

    def run(self, batch, prev_tokens: torch.Tensor | None = None,
            sampled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, tokens) of the real rows of a decode batch: greedy tokens, or with `sampled` tokens sampled
        at the temperatures and noise the caller put in `self.temperature` and `self.noise` (batch order).

        With `prev_tokens` (the device tokens of the step still in flight for the same rows), each row runs
        one position ahead and takes its input token from that tensor, without a round trip to the host. The
        tokens returned are a view that the step after next overwrites: read them (`to_host`) before then."""
        n = len(batch)
        b = next(s for s in self.sizes if s >= n)
        ahead = int(prev_tokens is not None)
        rows = [(item.seq.token_ids[-1], item.seq.num_computed_tokens + ahead, item.seq.block_table)
                for item in batch]
        need = max((len(table) for *_, table in rows), default=1)
        w = next(w for w in self.widths(b) if w >= need)
        t = self.turn = self.turn ^ 1
        meta = self._meta(b, w, self._fill(b, w, rows, t), t)
        # Chained: the tokens in flight are those the last graph left in this buffer's input ids (every row kept).
        chained = prev_tokens is not None and prev_tokens.data_ptr() == self.inputs[t].data_ptr()
        main = self.main = torch.cuda.current_stream() if self.upload is not None else None
        if chained and main is not None:
            # Off the critical path: the copy waits only for the graph two steps back, this buffer's last reader.
            with torch.cuda.stream(self.upload):
                self.upload.wait_event(self.released[t])
                self._upload(t, b, w, skip_ids=True)
                self.uploaded[t].record()
            main.wait_event(self.uploaded[t])
        else:
            if main is not None and not chained:  # the input ids about to be overwritten hold the last tokens
                main.wait_event(self.fetched[t])
            self._upload(t, b, w, skip_ids=chained)
            if prev_tokens is not None and not chained:  # input_ids are the first field of the device buffer
                self.inputs[t][:n].copy_(prev_tokens[:n])
        for plan in self.runner.plans:
            plan(meta, self.runner.plan_context)
        if not self.capture_graphs:
            hidden, tokens = self._run(b, meta, sampled, t)
            return hidden[:n], tokens[:n]
        main.wait_event(self.fetched[1 - t])  # the graph writes its tokens over those of the step two back
        self.graphs[b, w, sampled, t].replay()
        self.released[t].record()
        hidden, tokens = self.outputs[b, w, sampled, t]
        return hidden[:n], tokens[:n]

    def to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Starts copying a step's tokens into pinned host memory, on a side stream so that the next graph need
        not wait for the copy; returns the host tensor and the event to wait on before reading it."""
        cuda = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=cuda)
        if self.download is None:
            host.copy_(tokens, non_blocking=cuda)
            return host, torch.cuda.current_stream().record_event() if cuda else None
        self.download.wait_stream(self.main or torch.cuda.current_stream())  # the stream of the last replay
        tokens.record_stream(self.download)
        with torch.cuda.stream(self.download):
            host.copy_(tokens, non_blocking=True)
        event = self.fetched[1 - self.turn] = self.download.record_event()  # the last graph's tokens' buffer
        return host, event
