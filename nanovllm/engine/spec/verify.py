"""The verify step: one forward pass that scores each sequence's last token and its drafts (k + 1 query rows
per sequence) against the paged KV cache, writing their K/V, and returns the logits of every row.

The step is decode-shaped: every query row is a request of its own, at its own position, over its sequence's
block table, so the layers run their decode sites (the decode-layer chain, the decode attention) at k + 1 rows
per sequence and read each weight once for all of them. The metadata is marked `verify`: the rows of a sequence
share its blocks, and a row sees the K/V the rows before it write in the same step, so a backend that fuses the
K/V write into its attention kernel writes every row's K/V first (AttentionMetadata.verify).

Eagerly each sequence has 1 + len(drafts) rows. `VerifyGraphs` captures the step per (batch size, k) with
k + 1 rows for every sequence (short draft lists padded; padding batch rows write to the scratch block), and
the greedy acceptance inside the graph, so that an all-greedy step reads back a few integers per sequence.

A step may be *chained*: launched before the step before it is read, with its rows laid out as if that step
kept `assumed[i]` of its drafts. The graph then moves each sequence's rows by the difference between the drafts
the step before kept and those assumed, and takes that step's next token as the first input, both read on the
device from what the step before left (`last`), so the host never waits between steps
(Speculator.launch_after). With a proposer that proposes on the device (Proposer.on_device), the graph also
appends the tokens each sequence keeps to a device copy of its tokens (`history`, uploaded when a chain starts)
and proposes the next step's drafts from it, so a chained step's drafts follow what was actually kept.
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
from nanovllm.ops.meta import build_metadata, verify_requests

log = logging.getLogger("nanovllm")

PAD_TOKEN = 0  # input id of the padded draft rows (their logits are ignored)
PER_SEQ = ("num_drafts", "chained", "assumed", "limit")  # the input fields of one value per sequence


def token_limit(seq: Sequence, max_model_len: int) -> int:
    """The most tokens `seq` may hold once a verify step's drafts are kept: the step's own next token then still
    fits max_tokens, and no draft lies past max_model_len."""
    return min(max_model_len, seq.num_prompt_tokens + seq.params.max_tokens - 1)


def verify_rows(seqs: list[Sequence], drafts: list[list[int]],
                assumed: list[int] | None = None) -> tuple[list[int], list[list[int]], list[int]]:
    """(input ids, block tables, KV lengths) of a verify step's rows: per sequence its uncomputed last token,
    then its drafts, each a one-query request over the sequence's blocks that sees the keys up to itself.
    `assumed[i]`: a chained step's sequence is taken to gain that many kept drafts and a next token from the step
    in flight (its first input is then a placeholder, which the graph replaces)."""
    ahead = [a + 1 for a in assumed] if assumed is not None else [0] * len(seqs)
    ids = list(itertools.chain.from_iterable([seq.token_ids[-1], *d] for seq, d in zip(seqs, drafts)))
    q_lens = [1 + len(d) for d in drafts]
    tables, seq_lens = verify_requests([seq.block_table for seq in seqs],
                                       [seq.num_computed_tokens + a + q for seq, a, q in zip(seqs, ahead, q_lens)],
                                       q_lens)
    return ids, tables, seq_lens


@torch.inference_mode()
def verify_logits_eager(runner, seqs: list[Sequence], drafts: list[list[int]]) -> torch.Tensor:
    """Logits (B, max_q, V) of an eager verify step: the logits of sequence i's row j at [i, j], rows past
    1 + len(drafts[i]) zero."""
    ids, tables, seq_lens = verify_rows(seqs, drafts)
    step = build_metadata(tables, seq_lens, runner.block_size)
    meta = dataclasses.replace(step.to_device(runner.device), verify=True)
    for plan in runner.plans:
        plan(meta, runner.plan_context)
    input_ids = torch.tensor(ids, dtype=torch.int64).to(runner.device, non_blocking=True)
    logits = runner.model.compute_logits(runner.forward(input_ids, meta.positions, meta))
    max_q = 1 + max(len(d) for d in drafts)
    pad_index = [i * max_q + j for i, d in enumerate(drafts) for j in range(1 + len(d))]
    index = torch.tensor(pad_index, dtype=torch.int64).to(runner.device, non_blocking=True)
    padded = logits.new_zeros(len(seqs) * max_q, logits.shape[1]).index_copy_(0, index, logits)
    return padded.view(len(seqs), max_q, -1)


@dataclasses.dataclass
class LaunchedVerify:
    """A verify step launched and not yet read: its sequences, their drafts (None: proposed on the device, known
    once read), and its result (VerifyGraphs.last's rows, n columns) on its way to pinned host memory (`event`
    completes when it is there; None: already there). A chained step also
    has, per sequence, the drafts of the step before that it took as kept (`assumed`) and the proposer's guess of
    that step's next token (`guesses`); `grounded` says, once the step before is read, whether both were right:
    only then are its own drafts likely to be kept."""

    seqs: list[Sequence]
    drafts: list[list[int]] | None
    result: torch.Tensor
    event: torch.cuda.Event | None
    assumed: list[int] | None = None
    guesses: list[int | None] | None = None
    grounded: list[bool] | None = None
    next_drafted: bool = False  # once read: the device proposer found drafts for the step after this one

    def read(self) -> tuple[list[int], list[int]]:
        """(drafts kept, the token after them) per sequence, `drafts` and `next_drafted` filled in; waits for the
        step."""
        if self.event is not None:
            self.event.synchronize()
        kept, following, num_drafts, *drafts, next_counts = self.result.tolist()
        if self.drafts is None:
            self.drafts = [[row[i] for row in drafts[:n]] for i, n in enumerate(num_drafts)]
        self.next_drafted = any(next_counts)
        return kept, following


class VerifyGraphs:
    """Captured verify steps: forward pass, LM head and greedy acceptance over b sequences of k + 1 rows
    each, for the decode graph batch sizes up to `max_batch_size`. Inputs live in one device buffer, filled
    by one copy per step from one of two pinned host buffers used in turn (a step is filled while the step
    before it may still be copying in). `capture_graphs=False` replays by running eagerly on the same padded
    buffers, which tests the padding and chaining on machines without a GPU.

    `last` (4 + k, max batch) holds what the latest replay left, per sequence: drafts kept, the token after them,
    the number of drafts, the drafts, and the number the device proposer proposed for the step after; a chained
    step reads the first two (see the module's docstring).
    `proposer`: with one that proposes on the device, chained steps take their drafts from it (`history`)."""

    def __init__(self, runner, k: int, max_batch_size: int, capture_graphs: bool = True, proposer=None):
        self.runner, self.k, self.capture_graphs = runner, k, capture_graphs
        self.propose = proposer.propose_on_device if proposer is not None and proposer.on_device else None
        self.rows_per_seq = k + 1
        self.sizes = [b for b in graph_batch_sizes(runner.config.max_num_seqs) if b <= max_batch_size]
        self.max_bs = self.sizes[-1]
        self.max_blocks = -(-runner.config.max_model_len // runner.block_size)
        self.scratch_block = runner.num_blocks
        n = self.max_bs * self.rows_per_seq
        # the fields side by side, each sized for the largest batch; the block table last (_upload)
        self.layout = {"input_ids": n, "positions": n, "slot_mapping": n, "seq_lens": n,
                       **dict.fromkeys(PER_SEQ, self.max_bs), "block_tables": n * self.max_blocks}
        size = sum(self.layout.values())
        cuda = runner.device.type == "cuda"
        pin = cuda and capture_graphs
        self.hosts = [torch.zeros(size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.turn = 0  # the host buffer of the latest step
        self.inputs = torch.zeros(size, dtype=torch.int64, device=runner.device)
        self.last = torch.zeros(4 + k, self.max_bs, dtype=torch.int64, device=runner.device)
        self.result_hosts = [torch.zeros((4 + k) * self.max_bs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        if self.propose is not None:  # each sequence's tokens, room for a step's k + 1 past max_model_len
            width = runner.config.max_model_len + k + 1
            self.history = torch.zeros(self.max_bs, width, dtype=torch.int64, device=runner.device)
            self.history_host = torch.zeros(self.max_bs, width, dtype=torch.int64, pin_memory=pin)
            self.history_copied: torch.cuda.Event | None = None
            self.proposed = torch.zeros(self.max_bs, k, dtype=torch.int64, device=runner.device)
            self.proposed_counts = self.last[3 + k]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # b -> (logits, last[:, :b])
        self.arange = torch.arange(n + 1, device=runner.device)
        self.host_views: dict[tuple[int, int], dict] = {}  # (turn, b) -> views of a host buffer's numpy twin
        self.metas: dict[int, AttentionMetadata] = {}  # b -> the step's metadata over the device buffer
        self.ready: list[int] = []
        self.pool = None

    def views(self, buf, b: int) -> dict:
        out, start = {}, 0
        rows = b * self.rows_per_seq
        for name, size in self.layout.items():
            used = {"block_tables": rows * self.max_blocks, **dict.fromkeys(PER_SEQ, b)}.get(name, rows)
            out[name] = buf[start:start + used]
            start += size
        out["block_tables"] = out["block_tables"].reshape(rows, self.max_blocks)
        return out

    def size_for(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def fits(self, seqs: list[Sequence], ahead: list[int] | None = None) -> bool:
        """Every sequence has blocks for k + 1 rows within max_model_len (after the `ahead[i]` tokens the step in
        flight may add), and a batch size holds them."""
        if self.size_for(len(seqs)) is None:
            return False
        limit = self.runner.config.max_model_len
        ahead = ahead or [0] * len(seqs)
        return all(seq.num_tokens + a + self.k <= min(limit, len(seq.block_table) * self.runner.block_size)
                   for seq, a in zip(seqs, ahead))

    def _fill(self, b: int, seqs: list[Sequence], drafts: list[list[int]] | None,
              assumed: list[int] | None) -> dict:
        """Fills the next host buffer for b sequences (the real ones, then padding rows on the scratch block).
        drafts None: the graph takes them from the device proposer."""
        k1, n = self.rows_per_seq, len(seqs)
        drafts = [[]] * n if drafts is None else drafts
        self.turn ^= 1
        key = (self.turn, b)
        if key not in self.host_views:
            self.host_views[key] = self.views(self.hosts[self.turn].numpy(), b)
        v = self.host_views[key]
        padded = [d + [PAD_TOKEN] * (self.k - len(d)) for d in drafts]
        ids, tables, seq_lens = verify_rows(seqs, padded, assumed)
        v["input_ids"][:] = PAD_TOKEN
        v["input_ids"][:n * k1] = ids
        v["num_drafts"][:] = 0
        v["num_drafts"][:n] = [len(d) for d in drafts]
        v["chained"][:] = 0
        v["assumed"][:] = 0
        if assumed is not None:
            v["chained"][:n] = 1
            v["assumed"][:n] = assumed
        if self.propose is not None:  # the device proposer's caps
            v["limit"][:] = 0
            v["limit"][:n] = [token_limit(seq, self.runner.config.max_model_len) for seq in seqs]
        step = build_metadata(tables, seq_lens, self.runner.block_size, rows=b * k1, width=self.max_blocks,
                              scratch_block=self.scratch_block, out=v)
        return step.host

    def _meta(self, b: int, host: dict) -> AttentionMetadata:
        """The step's metadata: views of the device buffer (the same tensors every step), with `host` set."""
        if b not in self.metas:
            v = self.views(self.inputs, b)
            rows = b * self.rows_per_seq
            self.metas[b] = AttentionMetadata(
                positions=v["positions"], slot_mapping=v["slot_mapping"], seq_lens=v["seq_lens"],
                block_tables=v["block_tables"], cu_seqlens_q=self.arange[:rows + 1], pad_index=self.arange[:rows],
                max_seqlen_q=1, max_seqlen_k=self.max_blocks * self.runner.block_size, graph_batch=rows, verify=True)
        meta = self.metas[b]
        meta.host = host
        return meta

    def _upload(self, b: int) -> None:
        """One copy of the used prefix: every field before the block table, then b sequences' table rows."""
        end = sum(self.layout.values()) - self.layout["block_tables"] + b * self.rows_per_seq * self.max_blocks
        self.inputs[:end].copy_(self.hosts[self.turn][:end], non_blocking=True)

    def _run(self, b: int, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The step on the device buffers: the chained rows laid out as the step before left them (its drafts kept,
        its next token, with a device proposer the drafts it proposed), the forward pass and LM head, greedy
        acceptance into `last`, and with a device proposer, the kept tokens appended to `history` and the next
        step's drafts proposed from it."""
        ops, k1 = self.runner.model.ops, self.rows_per_seq
        v = self.views(self.inputs, b)
        ids = v["input_ids"].view(b, k1)
        device_drafts = self.propose is not None
        ops.verify_layout(ids, v["positions"], v["seq_lens"], v["slot_mapping"], v["num_drafts"], v["chained"],
                          v["assumed"], v["block_tables"], self.last, self.proposed[:b] if device_drafts else None,
                          self.proposed_counts[:b] if device_drafts else None, self.runner.block_size)
        logits = self.runner.model.compute_logits(self.runner.forward(v["input_ids"], v["positions"], meta))
        rows = logits.view(b, k1, -1)
        last, lengths, caps = ops.verify_accept(rows.argmax(dim=-1), ids, v["num_drafts"], v["positions"], v["limit"],
                                                self.history[:b] if device_drafts else None)
        self.last[:3 + self.k, :b] = last
        if device_drafts:
            drafts, counts = self.propose(self.history[:b], lengths, caps)
            self.proposed[:b] = drafts
            self.proposed_counts[:b] = counts
        return rows, self.last[:, :b]

    @torch.inference_mode()
    def capture(self, sizes=None) -> float:
        t0 = time.perf_counter()
        for b in sorted(set(sizes or self.sizes) - set(self.ready), reverse=True):
            if self.capture_graphs:
                meta = self._meta(b, self._fill(b, [], [], None))
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
    def run(self, seqs: list[Sequence], drafts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (n, k + 1, V), greedy (2, n): drafts kept and the token after them, as verify_accept) of the
        real sequences, on the device; rows past a sequence's drafts are padding."""
        n = len(seqs)
        logits, last = self._replay(seqs, drafts, None)
        return logits[:n], last[:2, :n]

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], drafts: list[list[int]] | None,
               assumed: list[int] | None = None) -> LaunchedVerify:
        """Launches the step without waiting for it; its result starts for the host at once (an all-greedy step's
        only read). With `assumed` (the drafts of the step in flight each sequence is taken to keep) it is chained
        on the step in flight; drafts None: chained, with the device proposer's drafts. A step that starts a
        chain uploads its sequences' tokens for the device proposer."""
        if assumed is None and self.propose is not None:
            self._upload_history(seqs)
        _, last = self._replay(seqs, drafts, assumed)
        b = last.shape[1]
        host = self.result_hosts[self.turn][:last.numel()].view(-1, b)
        host.copy_(last, non_blocking=host.is_pinned())
        event = torch.cuda.current_stream().record_event() if last.is_cuda else None
        return LaunchedVerify(seqs, drafts, host[:, :len(seqs)], event, assumed)

    def _upload_history(self, seqs: list[Sequence]) -> None:
        """Copies each sequence's tokens into its row of `history`, through the pinned host copy (free again once
        the copy before is done)."""
        if self.history_copied is not None:
            self.history_copied.synchronize()
        host = self.history_host.numpy()
        for i, seq in enumerate(seqs):
            host[i, :seq.num_tokens] = seq.token_ids
        width = max(seq.num_tokens for seq in seqs)
        self.history[:len(seqs), :width].copy_(self.history_host[:len(seqs), :width], non_blocking=True)
        self.history_copied = torch.cuda.current_stream().record_event() if self.history.is_cuda else None

    def _replay(self, seqs: list[Sequence], drafts: list[list[int]],
                assumed: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fills, uploads and replays the step of the batch size that holds the sequences: its (logits, last)
        for every row of that batch size, padding included."""
        b = self.size_for(len(seqs))
        if b not in self.ready:
            log.info("captured the verify graph of batch size %d (k=%d) in %.2f s", b, self.k, self.capture([b]))
        meta = self._meta(b, self._fill(b, seqs, drafts, assumed))
        self._upload(b)
        for plan in self.runner.plans:
            plan(meta, self.runner.plan_context)
        if self.capture_graphs:
            self.graphs[b].replay()
            return self.outputs[b]
        return self._run(b, meta)
