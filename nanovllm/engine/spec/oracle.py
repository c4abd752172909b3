"""The oracle proposer: proposes a recorded continuation of each prompt, the target's own greedy output. Every
draft of a greedy request is then accepted, so a bench run with it measures the mechanism's cost alone, apart
from any proposer's quality.

It proposes the recorded tokens at the sequence's current length even after the sequence has left them (they
are then rejected), so that every step of a run is a verify step. Its output is then the target's greedy
continuation as verify steps compute it: recorded from such a run (`remember`), it is accepted in full by the
next run, also where the verify step's rounding differs from the plain decode step's (near-ties of random
weights in bf16)."""

from __future__ import annotations

from nanovllm.engine.sequence import Sequence
from nanovllm.engine.spec.proposer import Proposer, register_proposer


@register_proposer("oracle")
class OracleProposer(Proposer):
    cheap = True  # a list lookup

    def __init__(self, config, engine):
        super().__init__(config, engine)
        self.continuations: dict[tuple[int, ...], list[int]] = {}
        self.by_seq: dict[int, list[int]] = {}  # seq_id -> its prompt's continuation, looked up once

    def remember(self, prompt_token_ids: list[int], completion_token_ids: list[int]) -> None:
        """Record the continuation to propose for a prompt."""
        self.continuations[tuple(prompt_token_ids)] = list(completion_token_ids)

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[list[int]]:
        out = []
        for seq, k in zip(seqs, max_tokens):
            known = self.by_seq.get(seq.seq_id)
            if known is None:
                known = self.by_seq[seq.seq_id] = self.continuations.get(tuple(seq.token_ids[:seq.num_prompt_tokens]),
                                                                         [])
            done = seq.num_completion_tokens
            out.append(known[done:done + k] if k > 0 else [])
        return out

    def release(self, seq: Sequence) -> None:
        self.by_seq.pop(seq.seq_id, None)
