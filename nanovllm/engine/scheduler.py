"""Continuous batching with chunked prefill and preemption by recompute.

Each step spends a token budget: running sequences first (a decode costs one token, an unfinished
prompt its next chunk), then waiting sequences in arrival order. When the KV cache runs out of
blocks, the most recently admitted sequence is preempted: its blocks are freed and it waits again,
to be recomputed later (its full blocks usually come back from the prefix cache).
"""

from __future__ import annotations

from collections import deque
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


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

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
        self.block_manager.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

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
