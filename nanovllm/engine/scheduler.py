"""Continuous batching with chunked prefill and preemption by recompute or swap.

Each step spends a token budget: running sequences first (a decode costs one token, an unfinished
prompt its next chunk), then waiting sequences in arrival order. When the KV cache runs out of
blocks, the most recently admitted sequence is preempted: its blocks are freed and it waits again,
to be recomputed later (its full blocks usually come back from the prefix cache), or, with a KV host tier,
its blocks are swapped out to the host and back in on readmission (`preemption_mode`: recompute, swap, or
auto: swap when the measured copy time is below the measured recompute time).

With async scheduling the scheduler also keeps the steps launched and not yet read, and decides which rows
of the step in flight run one step ahead (`schedule_ahead`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # After this step the sequence has no uncomputed token, so its last logits give a new token.
    completes: bool = field(init=False)

    def __post_init__(self):
        self.completes = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class LaunchedStep:
    """A step launched and not yet read: its batch, and the runner's handle of its tokens (`read()`; for a
    step that runs ahead also `rows(keep)`, the device tokens of rows `keep`)."""

    batch: list[ScheduledSeq]
    tokens: object


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.launched: deque[LaunchedStep] = deque()  # oldest first; at most one between engine steps
        self.num_preemptions = 0
        self.num_swapped_out = 0  # preemptions that swapped to the host tier (of num_preemptions)
        self.preemption_mode = config.preemption_mode
        # auto: (blocks to swap, tokens to recompute) -> whether swapping is cheaper (set by the engine)
        self.swap_is_cheaper: Callable[[int, int], bool] = lambda num_blocks, num_tokens: False

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.launched)

    @property
    def in_flight(self) -> LaunchedStep | None:
        """The newest step launched and not yet read."""
        return self.launched[-1] if self.launched else None

    def add_launched(self, batch: list[ScheduledSeq], tokens) -> None:
        """Records a launched step and the runner's handle of its tokens."""
        self.launched.append(LaunchedStep(batch, tokens))

    def take_oldest(self) -> LaunchedStep:
        """The oldest launched step, to be read now (its tokens go to `advance` and the sequences)."""
        return self.launched.popleft()

    def schedule_ahead(self, may_run_ahead) -> tuple[list[ScheduledSeq], list[int]] | None:
        """The decode rows of the step in flight one token later and their indices in its batch, to launch on
        its device tokens before it is read; None when the batch may change before then (a request waits to
        be admitted, or a row has no KV slot) or `may_run_ahead(batch)` (its StepMode's run_ahead) is False.
        Rows that reach their length limit with the step in flight are left out (requests finish at different
        steps: waiting for each would make every such step synchronous); a row that stops on EOS is dropped
        later, when its token is read."""
        step = self.in_flight
        if step is None:
            return None
        seqs = [item.seq for item in step.batch]
        if self.waiting or self.running != seqs or not may_run_ahead(step.batch):
            return None
        keep = [i for i, seq in enumerate(seqs) if seq.num_completion_tokens + 2 <= seq.params.max_tokens
                and seq.num_tokens + 2 <= self.max_model_len]
        if not keep or not all(self.block_manager.grow(seqs[i], seqs[i].num_tokens + 1) for i in keep):
            return None
        return [ScheduledSeq(seqs[i], 1) for i in keep], keep

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.grow(seq, seq.num_computed_tokens + n):
                preempted = True
                self._preempt(self.running.pop())
                if self.running[i:i + 1] != [seq]:  # it preempted itself
                    break
            else:
                batch.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self.block_manager.admit(seq, budget)
            if n is None:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        if self._swaps(seq):
            self.block_manager.swap_out(seq)
            self.num_swapped_out += 1
        else:
            self.block_manager.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _swaps(self, seq: Sequence) -> bool:
        """Whether preempting `seq` swaps it out (else it is recomputed): never without room in the host tier."""
        bm = self.block_manager
        if self.preemption_mode == "recompute" or not bm.can_swap_out(seq):
            return False
        computed = seq.num_computed_tokens
        return self.preemption_mode == "swap" or self.swap_is_cheaper(bm.blocks_needed(computed), computed)

    @property
    def num_swapped(self) -> int:
        """Waiting sequences whose blocks are in the host tier."""
        return sum(1 for seq in self.waiting if seq.swapped_blocks)

    def advance(self, batch: list[ScheduledSeq]) -> None:
        """Mark the step's tokens as computed and share their full blocks through the prefix cache."""
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(item.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.block_manager.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
