"""The engine loop: requests in, one scheduled forward pass per step, token deltas out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import count

from nanovllm.checkpoints import resolve_model
from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import NO_TEXT, Detokenizer
from nanovllm.engine.kv_host_tier import KVHostTier
from nanovllm.engine.logits_processing import needs_host_state
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.prompts import encode_prompt
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.spec import make_proposer
from nanovllm.engine.spec.speculator import Speculator
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.grammars import GrammarCompiler

log = logging.getLogger("nanovllm")


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]            # new tokens this step
    text: str                       # new text this step
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)  # per new token: {"token_logprob", "top": {id: lp}}
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    # On a request's first output only: its prompt token ids (after truncate_prompt_tokens) and, when asked,
    # its prompt logprobs (None for the first token, then {"token_logprob", "rank", "top": {id: lp}}).
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict | None] | None = None
    # Speculative decoding, the request's running totals: verify steps with drafts, drafted tokens, and
    # drafted tokens the target kept (all 0 without speculation).
    spec_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        self.model_path = resolve_model(config.model, revision=config.revision)
        self.speculator = None
        # A proposer with a model of its own (a draft model) loads first, so that the target's KV cache is
        # sized from the memory left after it.
        proposer = make_proposer(config.speculative_config, self) if config.speculative_config.enabled else None
        try:
            self.runner = ModelRunner(config, self.model_path)
        except BaseException:
            if proposer is not None:
                proposer.close()
            raise
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        self.vocab_size = self.runner.args.vocab_size
        self.kv_tier = KVHostTier(self.runner, config.kv_offload_gb) if config.kv_offload_gb > 0 else None
        if self.kv_tier is not None:
            log.info("%s", self.kv_tier.summary)
        self.block_manager = BlockManager(self.runner.num_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching, self.kv_tier and self.kv_tier.pool)
        if self.runner.num_blocks * config.kvcache_block_size < config.max_model_len:
            raise ValueError(f"the KV cache holds {self.runner.num_blocks * config.kvcache_block_size} tokens, "
                             f"less than max_model_len={config.max_model_len}; lower max_model_len or give the "
                             "cache more memory")
        self.scheduler = Scheduler(config, self.block_manager)
        if self.kv_tier is not None:
            self.scheduler.swap_is_cheaper = self.kv_tier.costs.swap_is_cheaper
        self.eos_ids = self._eos_ids()
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
        self.requests: dict[str, tuple[Sequence, Detokenizer]] = {}
        self._ids = count()
        self.verify_in_flight = None  # a pipelined verify step launched and not yet read (LaunchedVerify)
        if proposer is not None:
            self.speculator = Speculator(self, proposer)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.runner.hf_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            ids.update(src if isinstance(src, list) else [src] if src is not None else [])
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(str(self.model_path), local_files_only=True).eos_token_id
            ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        except OSError:
            pass
        return ids

    def tokenize(self, prompt, keep_last: int | None = None) -> list[int]:
        """Checks one prompt (text or token ids) and returns its ids, only the last `keep_last` of them when
        given (before the length check); raises ValueError naming the problem."""
        return encode_prompt(self.tokenizer, prompt, max_model_len=self.config.max_model_len,
                             vocab_size=self.vocab_size, keep_last=keep_last)

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against this model's vocabulary."""
        bad = sorted(t for t in (params.logit_bias or {}) if t >= self.vocab_size)
        if bad:
            raise ValueError(f"logit_bias names token ids outside the vocabulary [0, {self.vocab_size}): {bad}")

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        self.check_params(params)
        ids = self.tokenize(prompt, params.truncate_prompt_tokens)
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(ids, params, request_id)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        seq.min_tokens_stop_ids = frozenset(t for t in stop_ids if t < self.vocab_size)
        if params.structured is not None:
            seq.matcher = self.grammars.matcher(params.structured)
        detok = Detokenizer(self.tokenizer, ids, params.stop, params.include_stop_str_in_output) \
            if params.detokenize else NO_TEXT
        self.requests[request_id] = (seq, detok)
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or already done."""
        entry = self.requests.pop(request_id, None)
        if entry is None:
            return False
        self.scheduler.finish(entry[0], "abort")
        if self.speculator is not None:
            self.speculator.release(entry[0])
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One forward pass's worth of new tokens: schedule, launch, read, append. A step whose mode may run
        ahead (StepMode.run_ahead: async scheduling) is followed at once by its rows one token later, launched
        on its device tokens before it is read, so each call returns the tokens of the step before; a deferred
        step launched ahead (grammar masks, penalties) is sampled once those tokens are appended. A pipelined
        verify step in flight (Speculator.pipelines) is read likewise, after the next one is launched."""
        if self.verify_in_flight is not None:
            return self._read_verify()
        sched = self.scheduler
        if sched.in_flight is None:
            batch = sched.schedule()
            if not batch:
                return []
            if self.speculates(batch):
                outputs = self._speculative_step(batch)
                if outputs is not None:
                    return outputs
            self.runner.ensure_graph(batch)
            self._run_kv_copies()
            t0 = time.perf_counter()
            sched.add_launched(batch, self.runner.launch(batch))
            if self.kv_tier is not None:
                self.kv_tier.observe_step(batch, time.perf_counter() - t0)
        ahead = sched.schedule_ahead(lambda batch: self.runner.step_mode(batch).run_ahead
                                     and (not self.speculates(batch) or self.speculator.nothing_to_draft(batch)))
        if ahead is not None:
            batch, keep = ahead
            self._run_kv_copies()
            sched.add_launched(batch, self.runner.launch(batch, sched.in_flight.tokens.rows(keep)))
        step = sched.take_oldest()
        tokens, logprobs = step.tokens.read()  # with a step launched ahead, the GPU already has it queued
        # a deferred step in flight samples once the host has the tokens before it: those of its rows first
        complete = sched.in_flight.tokens.complete if sched.in_flight is not None else None
        return self._finish_step(step.batch, tokens, logprobs, complete)

    def _run_kv_copies(self) -> None:
        """Have the host tier run the block copies the scheduler recorded, before the next forward."""
        if self.kv_tier is not None:
            self.kv_tier.run(self.block_manager.take_copies())

    def speculates(self, batch) -> bool:
        """Whether a scheduled batch takes a speculative step (Speculator.eligible); then no step runs ahead
        of it, since its drafts depend on its tokens, unless a cheap lookup finds none (nothing_to_draft)."""
        return self.speculator is not None and self.speculator.eligible(batch)

    def _speculative_step(self, batch) -> list[RequestOutput] | None:
        """Draft, verify and emit: each sequence gets its kept drafts and the target's next token. None (and
        nothing changed) when no sequence has a draft: the batch then decodes plainly. A pipelined batch
        (Speculator.pipelines) launches its verify step and reads it through `_read_verify`."""
        spec = self.speculator
        seqs = [item.seq for item in batch]
        drafts = spec.draft(seqs)
        self._run_kv_copies()  # the blocks scheduled and grown for drafts, before the verify forward
        if not any(drafts):
            for seq in seqs:  # room grown for drafts that did not come
                self.block_manager.trim(seq, seq.num_tokens)
            return None
        if spec.pipelines(seqs):
            self.verify_in_flight = spec.launch(seqs, drafts)
            if self.verify_in_flight is not None:
                return self._read_verify()
        return self._emit_verified(seqs, spec.verify(seqs, drafts))

    def _read_verify(self) -> list[RequestOutput]:
        """Reads the verify step in flight, after launching the next one chained on it (Speculator.launch_after)
        while the batch goes on unchanged: no request waits to be admitted, none finished or was aborted."""
        step, spec, sched = self.verify_in_flight, self.speculator, self.scheduler
        goes_on = not sched.waiting and sched.running == step.seqs and spec.pipelines(step.seqs)
        self.verify_in_flight = spec.launch_after(step) if goes_on else None
        outputs = self._emit_verified(step.seqs, spec.read(step, self.verify_in_flight), self.verify_in_flight)
        if self.verify_in_flight is not None and all(seq.is_finished for seq in self.verify_in_flight.seqs):
            self.verify_in_flight = None  # every request of the step just launched ended: nothing to read
        return outputs

    def _emit_verified(self, seqs, results, next_step=None) -> list[RequestOutput]:
        """Emits each sequence's verified tokens. The K/V of its last token and of its kept drafts is in the
        cache: those tokens count as computed, the full blocks they fill (kept tokens only) are hashed, and the
        room of rejected drafts is freed, except the room of the k + 1 rows of `next_step` (chained, in flight).
        A request that ended while its step was in flight gets nothing."""
        chained = {seq.seq_id for seq in next_step.seqs} if next_step is not None else set()
        outputs = []
        for seq, result in zip(seqs, results):
            if seq.is_finished:
                continue
            kept = result.tokens[:-1]
            seq.spec_steps += result.num_drafts > 0
            seq.spec_draft_tokens += result.num_drafts
            seq.spec_accepted_tokens += len(kept)
            seq.token_ids.extend(kept)
            seq.num_computed_tokens = seq.num_tokens
            self.block_manager.commit(seq)
            self.block_manager.trim(seq, seq.num_tokens + 1 + (self.speculator.k if seq.seq_id in chained else 0))
            del seq.token_ids[seq.num_tokens - len(kept):]
            outputs.append(self._append_tokens(seq, result.tokens, result.logprobs))
        return outputs

    def _finish_step(self, batch, tokens, logprobs, then=None) -> list[RequestOutput]:
        """Appends a step's tokens. `then` (the sampling of a deferred step in flight, StepMode.deferred) runs
        as soon as the rows whose sampling reads the host's state (needs_host_state) have theirs, before the
        other rows are appended (detokenized, stop-checked): the GPU samples while the host goes on."""
        live = [(item, tok, lp) for item, tok, lp in zip([i for i in batch if i.completes], tokens, logprobs)
                if not item.seq.is_finished]  # a request aborted or stopped while its step was in flight
        self.scheduler.advance([item for item in batch if not item.seq.is_finished])
        first = {i for i, (item, _, _) in enumerate(live) if then is not None and needs_host_state(item.seq)}
        outputs = {i: self._append(live[i][0].seq, *live[i][1:]) for i in sorted(first)}
        if then is not None:
            then()
        outputs.update((i, self._append(item.seq, tok, lp)) for i, (item, tok, lp) in enumerate(live) if i not in first)
        return [outputs[i] for i in range(len(live))]

    def _append(self, seq: Sequence, token: int, logprobs: dict | None) -> RequestOutput:
        return self._append_tokens(seq, [token], [logprobs])

    def _append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list[dict | None]) -> RequestOutput:
        """Append a step's tokens (one, or a speculative step's several) in order, stopping at the first that
        finishes the request (stop string or id, grammar end, max_tokens, max_model_len): none after it is
        emitted. One output for them all."""
        detok = self.requests[seq.request_id][1]
        reason, added = None, []
        for token, lp in zip(tokens, logprobs):
            seq.token_ids.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
            added.append((token, lp))
            reason = self._stop_reason(seq, token, detok)
            if reason:
                break
        if reason:
            self.scheduler.finish(seq, reason)
            if self.speculator is not None:
                self.speculator.release(seq)
            del self.requests[seq.request_id]
        out = RequestOutput(seq.request_id, [t for t, _ in added], detok.delta(reason is not None),
                            reason is not None, reason, [lp for _, lp in added if lp is not None],
                            seq.num_prompt_tokens, seq.num_completion_tokens, spec_steps=seq.spec_steps,
                            spec_draft_tokens=seq.spec_draft_tokens, spec_accepted_tokens=seq.spec_accepted_tokens)
        if seq.num_completion_tokens == len(added):
            out.prompt_token_ids = seq.token_ids[:seq.num_prompt_tokens]
            out.prompt_logprobs = seq.prompt_logprobs
        return out

    def _stop_reason(self, seq: Sequence, token: int, detok) -> str | None:
        """Why the request ends at `token`, just appended (None: it goes on)."""
        p = seq.params
        may_stop = seq.num_completion_tokens >= p.min_tokens  # before min_tokens, no stop string or stop id ends it
        hit_stop = detok.add(token, check_stop=may_stop)
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            log.error("request %s: token %d is outside its grammar; finishing it", seq.request_id, token)
            return "stop"
        if hit_stop or (seq.matcher is not None and seq.matcher.is_terminated()):
            return "stop"
        if may_stop and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)):
            return "stop"
        if seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None
