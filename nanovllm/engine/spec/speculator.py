"""The engine's side of speculative decoding: which decode steps speculate, the drafts' KV room, the verify step,
and the acceptance statistics.

A decode batch speculates when it has at most `max_batch_size` sequences. A request whose logits change before
sampling (penalties, logit_bias, min_tokens: StepMode ADJUSTED) or that follows a grammar (StepMode masked) is
never drafted for: each of its tokens needs the host's token list (or grammar state) after the token before.
In a speculative step it is a one-row sequence whose token is sampled from its adjusted, masked logits, as the
plain path samples it.

An all-greedy batch with a cheap proposer (a lookup on the tokens: ngram, oracle) is pipelined: the next verify
step is launched before the one in flight is read, and the graph corrects the layout on the device (verify.py),
so the host's work of a step (reading, emitting, drafting) overlaps the GPU's. A proposer that proposes on the
device (ngram) drafts the next step inside the graph, after the tokens actually kept; another (the oracle)
drafts on the host, as if the step in flight kept all its drafts (none, when they were proposed from a history
the reads since have refuted). Other speculative steps run synchronously: their drafts or their sampling depend
on the tokens just kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from nanovllm.engine.logits_processing import needs_host_state
from nanovllm.engine.scheduler import ScheduledSeq
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.spec.proposer import Proposer
from nanovllm.engine.spec.rejection import accept
from nanovllm.engine.spec.verify import LaunchedVerify, VerifyGraphs, token_limit, verify_logits_eager

log = logging.getLogger("nanovllm")


@dataclass
class SpecTotals:
    """Running totals over the engine's life (vLLM's spec_decode counters)."""

    num_drafts: int = 0            # verify steps of a sequence with at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: drafts kept at draft position j

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step of a sequence: 1 + kept drafts per drafting step."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


@dataclass
class Verified:
    """What a verify step gave one sequence: the tokens to emit (kept drafts, then the target's next token)."""

    tokens: list[int]
    logprobs: list[dict | None]
    num_drafts: int

    @property
    def num_accepted(self) -> int:
        return len(self.tokens) - 1


class Speculator:
    def __init__(self, engine, proposer: Proposer):
        self.config = engine.config.speculative_config
        self.k = self.config.num_speculative_tokens
        self.max_model_len = engine.config.max_model_len
        self.runner = engine.runner
        self.block_manager = engine.block_manager
        self.vocab_size = engine.vocab_size
        self.proposer = proposer
        self.totals = SpecTotals(accepted_per_position=[0] * self.k)
        self.graphs = None
        self.drafting = False  # the device proposer found drafts for the step after the latest one read
        # a plan hook that prepares decode steps on the host reads the KV lengths a chained step corrects
        self.may_pipeline = (engine.config.async_scheduling
                             and not any(getattr(plan, "plans_decode", True) for plan in self.runner.plans))
        if self.runner.graphs is not None:
            self.graphs = VerifyGraphs(self.runner, self.k, self.config.max_batch_size, proposer=proposer)
            try:  # batch size 1 now, as the decode graphs: a single user's first step pays no capture
                log.info("captured the verify graph of batch size 1 (k=%d) in %.2f s", self.k, self.graphs.capture([1]))
            except Exception as e:  # e.g. a backend whose plan cannot be captured
                self._run_eagerly(e)

    def eligible(self, batch: list[ScheduledSeq]) -> bool:
        """Whether a scheduled batch speculates: a decode batch of at most max_batch_size rows, one of them at
        least open to drafts. A row may be a prompt's last token (a full prefix-cache hit, or a last chunk of
        one token): its drafts then follow the prompt."""
        return (0 < len(batch) <= self.config.max_batch_size
                and all(item.num_new_tokens == 1 and item.completes and not self.prompt_logprobs_pending(item.seq)
                        for item in batch)
                and not all(needs_host_state(item.seq) for item in batch))

    @staticmethod
    def prompt_logprobs_pending(seq: Sequence) -> bool:
        """The row is a prompt's last chunk whose prompt logprobs the plain path still records."""
        return seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens

    def caps(self, seqs: list[Sequence], ahead: list[int] | None = None) -> list[int]:
        """How many drafts each sequence may take: at most k, none past max_tokens or max_model_len (after the
        `ahead[i]` tokens the step in flight is taken to add)."""
        ahead = ahead or [0] * len(seqs)
        return [0 if needs_host_state(seq) else
                max(0, min(self.k, token_limit(seq, self.max_model_len) - seq.num_tokens - a))
                for seq, a in zip(seqs, ahead)]

    def nothing_to_draft(self, batch: list[ScheduledSeq]) -> bool:
        """Whether a batch that may speculate has no drafts now, by a cheap proposer's lookup on the host's
        tokens (which lag the step in flight by one). Its plain decode steps then run ahead, as a batch that does
        not speculate does, until a lookup finds a draft and the next step speculates; a synchronous plain step
        costs a small model about half again a step run ahead. Always False for a proposer that is not cheap."""
        if not self.proposer.cheap:
            return False
        seqs = [item.seq for item in batch]
        return not any(self.proposer.propose(seqs, self.caps(seqs)))

    def _valid(self, proposed, cap: int) -> list[int]:
        """A proposal as drafts: at most `cap` tokens, up to the first outside the vocabulary."""
        d = [int(t) for t in proposed[:cap]]
        bad = next((i for i, t in enumerate(d) if not 0 <= t < self.vocab_size), None)
        return d[:bad] if bad is not None else d

    def draft(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each sequence's drafts, at most k (caps), each with KV room."""
        caps = self.caps(seqs)
        drafts = []
        for seq, cap, proposed in zip(seqs, caps, self.proposer.propose(seqs, caps)):
            d = self._valid(proposed, cap)
            # The verify graphs score k drafts per row (short lists padded): give them room when it is there.
            room = self.k if self.graphs is not None and seq.num_tokens + self.k <= self.max_model_len else len(d)
            if d and not self.block_manager.grow(seq, seq.num_tokens + room):
                d = d if self.block_manager.grow(seq, seq.num_tokens + len(d)) else []
            drafts.append(d)
        return drafts

    def pipelines(self, seqs: list[Sequence]) -> bool:
        """Whether the batch's verify steps are pipelined (see the module's docstring): captured verify steps,
        a cheap proposer, greedy rows that want no logprobs, and no plan hook that reads decode steps' lengths."""
        return (self.may_pipeline and self.graphs is not None and self.proposer.cheap
                and all(seq.params.greedy and seq.params.logprobs is None and not needs_host_state(seq)
                        for seq in seqs))

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], drafts: list[list[int]]) -> LaunchedVerify | None:
        """Launches the verify step of a pipelined batch (`pipelines`) without waiting for it; None when the
        graphs do not fit it (the caller verifies synchronously)."""
        if not self.graphs.fits(seqs):
            return None
        self.drafting = True
        return self.graphs.launch(seqs, drafts)

    @torch.inference_mode()
    def launch_after(self, step: LaunchedVerify) -> LaunchedVerify | None:
        """Launches the step after `step` (in flight, not read), chained on it; None (nothing launched) when the KV
        room is short or there are no drafts. A device proposer drafts it in the graph, after the tokens `step`
        keeps; the chain ends once the step after the latest one read has none (likely, then, the next too).
        Otherwise the host drafts it (`_draft_after`)."""
        if self.graphs.propose is None:
            return self._draft_after(step)
        seqs = step.seqs
        if not self.drafting:
            return None
        # tokens `step` may add: all its rows, when its drafts are still on the device
        most = [len(d) + 1 for d in step.drafts] if step.drafts is not None else [self.k + 1] * len(seqs)
        if not self._room(seqs, most):
            return None
        return self.graphs.launch(seqs, None, [0] * len(seqs))

    def _room(self, seqs: list[Sequence], most: list[int]) -> bool:
        """KV room for a chained step's k + 1 rows after the `most[i]` tokens the step in flight may add."""
        return (all(self.block_manager.grow(seq, seq.num_tokens + m + self.k) for seq, m in zip(seqs, most))
                and self.graphs.fits(seqs, most))

    def _draft_after(self, step: LaunchedVerify) -> LaunchedVerify | None:
        """Drafts the step after `step` on the host. Each sequence is taken to keep all of `step`'s drafts when
        they are grounded (proposed from a history the reads since have confirmed), else none of them, and then to
        gain `step`'s next token, which the proposer guesses; the graph corrects the layout on the device. So a
        rejected draft costs one step of one token, not a run of them."""
        seqs = step.seqs
        grounded = step.grounded or [True] * len(seqs)
        assumed = [d if ok else [] for d, ok in zip(step.drafts, grounded)]
        most = [len(d) + 1 for d in step.drafts]  # tokens `step` may add: the layout moves by up to that much
        caps = self.caps(seqs, most)
        proposed = self.proposer.propose_after(seqs, assumed, caps)
        drafts = [self._valid(p[1:], cap) for p, cap in zip(proposed, caps)]
        if not any(drafts) or not self._room(seqs, most):
            return None  # the step in flight's read trims the room
        launched = self.graphs.launch(seqs, drafts, [len(a) for a in assumed])
        launched.guesses = [p[0] if p else None for p in proposed]
        return launched

    def read(self, step: LaunchedVerify, successor: LaunchedVerify | None = None) -> list[Verified]:
        """A launched step's results (greedy rows, no logprobs), its totals counted. `successor`, the step
        chained on it (in flight), learns which of its sequences' drafts are grounded: those whose assumption
        about this step (drafts kept, next token) was right."""
        kept, following = step.read()
        if successor is not None and successor.guesses is not None:
            successor.grounded = [k == a and t == g for k, t, a, g in
                                  zip(kept, following, successor.assumed, successor.guesses)]
        self.drafting = step.next_drafted
        out = [Verified(d[:a] + [t], [None] * (a + 1), len(d)) for d, a, t in zip(step.drafts, kept, following)]
        self._count(out)
        self.proposer.observe(step.seqs, None)
        return out

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], drafts: list[list[int]]) -> list[Verified]:
        """Score the drafts with the target and keep those it accepts (greedy: equal to its argmax; sampled:
        rejection sampling). Updates the totals."""
        logits = greedy = None
        if self.graphs is not None and self.graphs.fits(seqs):
            try:
                logits, greedy = self.graphs.run(seqs, drafts)
            except Exception as e:  # capturing a new batch size failed
                if not self.graphs.capture_graphs or self.graphs.size_for(len(seqs)) in self.graphs.graphs:
                    raise
                self._run_eagerly(e)
        if logits is None:
            logits = verify_logits_eager(self.runner, seqs, drafts)
        if greedy is not None and all(seq.params.greedy and not needs_host_state(seq) for seq in seqs):
            kept, following = greedy.tolist()  # the graph's own acceptance: one small read, no launch
        else:
            kept, following = self._accept(logits, seqs, drafts)
        tokens = [d[:a] + [t] for d, a, t in zip(drafts, kept, following)]
        logprobs = self._logprobs(logits, seqs, tokens)
        out = [Verified(t, lp, len(d)) for t, lp, d in zip(tokens, logprobs, drafts)]
        self._count(out)
        self.proposer.observe(seqs, None)
        return out

    def _run_eagerly(self, error: Exception) -> None:
        log.warning("verify steps run eagerly: capturing their CUDA graph failed (%s: %s)", type(error).__name__,
                    error)
        self.graphs = None

    def _accept(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> tuple[list, list]:
        """(drafts kept, the token after them) per sequence, from the verify logits: rejection sampling for the
        sampled rows, the plain path's sampling for one-token-at-a-time rows."""
        runner = self.runner
        dev = runner.device
        k = logits.shape[1] - 1
        padded = torch.tensor([d + [0] * (k - len(d)) for d in drafts], dtype=torch.int64).to(dev)
        num_drafts = torch.tensor([len(d) for d in drafts], dtype=torch.int64).to(dev)
        temperature, top_k, top_p, min_p, noise = runner.sampling_tensors(seqs)
        uniform = None
        if noise is not None:
            uniform = torch.rand(len(seqs), k, generator=runner.generator, device=dev)
            for i, seq in enumerate(seqs):
                if seq.generator is not None:
                    uniform[i] = torch.rand(k, generator=seq.generator, device=dev)
        kept, following = accept(logits, padded, num_drafts, temperature, (top_k, top_p, min_p), uniform, noise)
        self._sample_adjusted_rows(following, logits, seqs)
        return torch.stack((kept, following)).tolist()

    def _sample_adjusted_rows(self, following: torch.Tensor, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Replace the token of each one-token-at-a-time row (no drafts: its token comes from logits row 0) by
        one sampled as the plain path does: penalties and biases applied, then the grammar's mask."""
        rows = [i for i, seq in enumerate(seqs) if needs_host_state(seq)]
        if not rows:
            return
        picked = [seqs[i] for i in rows]
        index = torch.tensor(rows, device=logits.device)
        first = logits[:, 0].index_select(0, index)
        adjusted = self.runner.adjusted_logits(first, picked)
        following.index_copy_(0, index, self.runner.model.ops.sample(adjusted, *self.runner.sampling_tensors(picked)))

    def _logprobs(self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[list[int]]) -> list[list]:
        """Per sequence, the logprobs of each emitted token from the row that scored it (the model's own, as
        plain decoding returns them), or Nones when the request asks for none."""
        want = [seq.params.logprobs for seq in seqs]
        if all(w is None for w in want):
            return [[None] * len(t) for t in tokens]
        rows = torch.cat([logits[i, :len(t)] for i, t in enumerate(tokens)])
        flat = torch.tensor([x for t in tokens for x in t], dtype=torch.int64, device=logits.device)
        per_token = self.runner._logprobs(rows, flat, [w for w, t in zip(want, tokens) for _ in t])
        out, start = [], 0
        for t in tokens:
            out.append(per_token[start:start + len(t)])
            start += len(t)
        return out

    def _count(self, results: list[Verified]) -> None:
        t = self.totals
        for r in results:
            if r.num_drafts:
                t.num_drafts += 1
                t.num_draft_tokens += r.num_drafts
                t.num_accepted_tokens += r.num_accepted
                for j in range(r.num_accepted):
                    t.accepted_per_position[j] += 1

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)

    def close(self) -> None:
        self.graphs = None
        self.proposer.close()
