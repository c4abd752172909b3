"""CUDA graphs for decode steps: one graph per batch size (and block-table width), replayed with fresh inputs.

Every per-step input lives in one device buffer whose host twin is pinned memory, so a step costs a
single host-to-device copy. There are two such pairs, used in turn, and a graph per pair (StepBuffers states
the ordering invariant). A batch is padded up to the smallest captured size that holds it; padded rows write
their K/V to the scratch block and read only it. Backends' plan hooks run before each replay, outside the
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

from nanovllm.engine.step_buffers import KeptRows, StepBuffers
from nanovllm.engine.step_mode import FILTERED, GREEDY, SAMPLED
from nanovllm.ops import AttentionMetadata
from nanovllm.ops.meta import build_metadata

log = logging.getLogger("nanovllm")


SHORT_MAX_ROWS = 8  # narrow-table graphs for batches up to this size (where the split count depends on it)
# Graphs that sample with top-k/top-p/min-p for batches up to this size: their sort of the vocabulary per row
# keeps (rows x vocab) buffers in the graphs' pool, so larger batches sample those filters outside the graph.
FILTERED_MAX_ROWS = 8


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    """Captured decode forward passes through sampling, for a set of batch sizes: a greedy graph per size
    (argmax LM head), a sampled one whose temperature and noise are the `temperature` and `noise` buffers,
    which the caller fills before the replay (`set_sampling`, `noise`: temperature-only sampling), and for
    sizes up to FILTERED_MAX_ROWS a filtered one that also reads the `top_k`, `top_p` and `min_p` buffers.

    `capture(sizes)` captures some batch sizes (all by default); `run` replays the smallest captured size
    that holds the batch, and `fits` is False for a batch no captured size holds (it then runs eagerly)."""

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
        self.buffers = StepBuffers(self.max_bs, self.max_blocks, runner.device, streams=capture_graphs)
        self.arange = torch.arange(self.max_bs + 1, device=runner.device)
        zeros = torch.zeros(self.max_bs, device=runner.device)
        self.greedy = (zeros, zeros.long() - 1, zeros + 1, zeros, None)
        # temperature, top_p, min_p (float32) and top_k (int64), each with a pinned host twin per step buffer
        # (set_sampling), and the noise in the runner's sampling workspace
        cuda = runner.device.type == "cuda"
        self.temperature, self.top_p, self.min_p = torch.zeros(3, self.max_bs, device=runner.device)
        self.top_k = torch.zeros(self.max_bs, dtype=torch.int64, device=runner.device)
        self.sampling_hosts = [(torch.zeros(3, self.max_bs, pin_memory=cuda),
                                torch.zeros(self.max_bs, dtype=torch.int64, pin_memory=cuda)) for _ in range(2)]
        self.noise = runner.workspaces.request("sampling_noise", (self.max_bs, runner.args.vocab_size),
                                               torch.float32, held="engine").fill_(1.0)
        self.ready: list[int] = []  # the captured batch sizes, ascending
        # keyed (batch size, table width, sampling: GREEDY, SAMPLED or FILTERED, buffer)
        self.graphs: dict[tuple[int, int, str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def widths(self, b: int) -> list[int]:
        """The block-table widths captured for batch size b, narrowest first."""
        return [self.short_blocks, self.max_blocks] if self.short_blocks and b <= SHORT_MAX_ROWS else [self.max_blocks]

    def captured(self, b: int) -> bool:
        return b in self.ready

    def size_for(self, n: int) -> int | None:
        """The smallest captured batch size that holds n rows, or None."""
        return next((b for b in self.ready if b >= n), None)

    def _meta(self, b: int, w: int, host: dict, t: int) -> AttentionMetadata:
        v = self.buffers.views(self.buffers.inputs[t], b, w)
        return AttentionMetadata(
            positions=v["positions"], slot_mapping=v["slot_mapping"], seq_lens=v["seq_lens"],
            block_tables=v["block_tables"], cu_seqlens_q=self.arange[:b + 1], pad_index=self.arange[:b],
            max_seqlen_q=1, max_seqlen_k=w * self.runner.block_size, host=host, graph_batch=b)

    def _fill(self, b: int, w: int, tokens: list[int], positions: list[int], tables: list[list[int]],
              t: int) -> dict:
        """Fills host buffer t with a step of one token per real row (its input id, position and block table,
        at most w blocks), padded up to b rows; returns the plan hooks' host arrays."""
        v = self.buffers.views(self.buffers.hosts[t].numpy(), b, w)
        v["input_ids"][:] = 0
        v["input_ids"][:len(tokens)] = tokens
        seq_lens = np.asarray(positions, dtype=np.int64) + 1
        return build_metadata(tables, seq_lens, self.runner.block_size, rows=b, width=w,
                              scratch_block=self.scratch_block, out=v).host

    def samplings(self, b: int) -> tuple[str, ...]:
        """The kinds of graph captured for batch size b."""
        return (GREEDY, SAMPLED, FILTERED) if b <= FILTERED_MAX_ROWS else (GREEDY, SAMPLED)

    def _run(self, b: int, meta: AttentionMetadata, sampling: str, t: int):
        v = self.buffers.views(self.buffers.inputs[t], b, meta.block_tables.shape[1])
        hidden = self.forward(v["input_ids"], v["positions"], meta)
        if sampling == SAMPLED:
            tokens = self.runner.model.sample(hidden, self.temperature[:b], None, None, None, self.noise[:b])
        elif sampling == FILTERED:
            tokens = self.runner.model.sample(hidden, self.temperature[:b], self.top_k[:b], self.top_p[:b],
                                              self.min_p[:b], self.noise[:b])
        else:
            tokens = self.runner.model.sample(hidden, *[x[:b] if x is not None else None for x in self.greedy])
        following = self.buffers.next_input_ids(t, b)  # for a step launched ahead on these tokens
        following.copy_(tokens)
        return hidden, following

    @torch.inference_mode()
    def capture(self, sizes=None) -> float:
        """Captures the graphs of the given batch sizes (default: every size), largest first so that smaller
        graphs reuse its memory pool; sizes captured before are skipped. Returns the seconds it took.
        Call it with no step in flight: capturing fills and copies into both step buffers."""
        t0 = time.perf_counter()
        sizes = self.sizes if sizes is None else list(sizes)
        unknown = sorted(set(sizes) - set(self.sizes))
        if unknown:
            raise ValueError(f"batch sizes {unknown} are not decode graph sizes (those are {self.sizes})")
        for b in sorted(set(sizes) - set(self.ready), reverse=True):
            if self.capture_graphs:
                self._capture(b)
            self.ready = sorted({*self.ready, b})
        if self.capture_graphs:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _capture(self, b: int) -> None:
        for w, t in itertools.product(reversed(self.widths(b)), (0, 1)):
            meta = self._meta(b, w, self._fill(b, w, [], [], [], t), t)
            self.buffers.copy(t, b, w)
            for plan in self.runner.plans:
                plan(meta, self.runner.plan_context)
            for sampling in self.samplings(b):
                for _ in range(2):  # warm up: JIT, autotuning and lazy allocations happen outside capture
                    self._run(b, meta, sampling, t)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[b, w, sampling, t] = self._run(b, meta, sampling, t)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[b, w, sampling, t] = graph

    def set_sampling(self, params, filters: bool = False) -> None:
        """Puts the rows' temperatures (and with `filters` their top-k, top-p and min-p) into the graphs' buffers
        for the next `run`, with no device allocation: through the host twins of the step buffer that run uses,
        which the step two back last read (StepBuffers: its tokens were read, so its copies are done, before
        this step launches). params: the rows' SamplingParams, in batch order."""
        n = len(params)
        floats, top_k = self.sampling_hosts[self.buffers.turn ^ 1]  # next_turn() in run() picks this buffer
        rows = floats.numpy()
        rows[0, :n] = [p.temperature for p in params]
        copies = [(self.temperature, floats[0])]
        if filters:
            rows[1, :n] = [p.top_p for p in params]
            rows[2, :n] = [p.min_p for p in params]
            top_k.numpy()[:n] = [max(p.top_k, 0) for p in params]
            copies += [(self.top_p, floats[1]), (self.min_p, floats[2]), (self.top_k, top_k)]
        for device, host in copies:
            device[:n].copy_(host[:n], non_blocking=True)

    def filters_fit(self, n: int) -> bool:
        """Whether a batch of n rows replays a graph that samples with top-k, top-p and min-p."""
        b = self.size_for(n)
        return b is not None and FILTERED in self.samplings(b)

    def fits(self, batch) -> bool:
        """Whether a batch can replay a graph: every row decodes one token, and a captured size holds it."""
        return (self.size_for(len(batch)) is not None
                and all(item.num_new_tokens == 1 and item.completes for item in batch))

    def run(self, batch, prev_tokens: torch.Tensor | KeptRows | None = None,
            sampled: bool = False, filtered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, tokens) of the real rows of a decode batch: greedy tokens, or with `sampled` tokens sampled
        at the temperatures and noise the caller put in `self.temperature` and `self.noise` (batch order), or
        with `filtered` (a batch `filters_fit`) also under the top-k, top-p and min-p put in their buffers.

        With `prev_tokens` (the device tokens of the step still in flight for the same rows), each row runs
        one position ahead and takes its input token from that tensor (KeptRows: from its rows that are kept),
        without a round trip to the host. The tokens returned are a view that the step after next overwrites:
        read them (StepBuffers.to_host) before then."""
        n = len(batch)
        b = self.size_for(n)
        if b is None:
            raise ValueError(f"no decode graph is captured for {n} rows (captured: {self.ready})")
        ahead = int(prev_tokens is not None)
        seqs = [item.seq for item in batch]
        tables = [seq.block_table for seq in seqs]
        need = max((len(table) for table in tables), default=1)
        w = next(w for w in self.widths(b) if w >= need)
        t = self.buffers.next_turn()
        host = self._fill(b, w, [seq.token_ids[-1] for seq in seqs],
                          [seq.num_computed_tokens + ahead for seq in seqs], tables, t)
        if isinstance(prev_tokens, KeptRows):
            self.buffers.views(self.buffers.hosts[t].numpy(), b, w)["prev_rows"][:n] = prev_tokens.keep
        meta = self._meta(b, w, host, t)
        self.buffers.upload(t, b, w, prev_tokens, n)
        for plan in self.runner.plans:
            plan(meta, self.runner.plan_context)
        sampling = FILTERED if filtered else SAMPLED if sampled else GREEDY
        if sampling not in self.samplings(b):
            raise ValueError(f"no {sampling} decode graph for batch size {b} (filtered ones up to "
                             f"{FILTERED_MAX_ROWS} rows)")
        if not self.capture_graphs:
            hidden, tokens = self._run(b, meta, sampling, t)
            return hidden[:n], tokens[:n]
        self.buffers.before_replay(t)
        self.graphs[b, w, sampling, t].replay()
        self.buffers.after_replay(t)
        hidden, tokens = self.outputs[b, w, sampling, t]
        return hidden[:n], tokens[:n]
