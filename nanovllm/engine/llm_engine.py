"""The engine loop: requests in, one scheduled forward pass per step, token deltas out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import count

from nanovllm.checkpoints import resolve_model
from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import NO_TEXT, Detokenizer
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import ScheduledSeq, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

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


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        self.model_path = resolve_model(config.model, revision=config.revision)
        self.runner = ModelRunner(config, self.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        self.vocab_size = self.runner.args.vocab_size
        self.block_manager = BlockManager(self.runner.num_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        if self.runner.num_blocks * config.kvcache_block_size < config.max_model_len:
            raise ValueError(f"the KV cache holds {self.runner.num_blocks * config.kvcache_block_size} tokens, "
                             f"less than max_model_len={config.max_model_len}; lower max_model_len or give the "
                             "cache more memory")
        self.scheduler = Scheduler(config, self.block_manager)
        self.eos_ids = self._eos_ids()
        self.requests: dict[str, tuple[Sequence, Detokenizer]] = {}
        self._ids = count()
        self.inflight = None  # (batch, PendingTokens) of a launched step not yet read (async scheduling)

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

    def tokenize(self, prompt) -> list[int]:
        """Checks one prompt (text or token ids) and returns its ids; raises ValueError naming the problem."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt is empty (no token ids)")
            for i, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"token id {t!r} at position {i} is outside the vocabulary "
                                     f"[0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty after tokenization")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.config.max_model_len} "
                             "(which must leave room for at least one new token)")
        return ids

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt)
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(ids, params, request_id)
        detok = Detokenizer(self.tokenizer, ids, params.stop) if params.detokenize else NO_TEXT
        self.requests[request_id] = (seq, detok)
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or already done."""
        entry = self.requests.pop(request_id, None)
        if entry is None:
            return False
        self.scheduler.finish(entry[0], "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.inflight is not None

    def step(self) -> list[RequestOutput]:
        """One forward pass's worth of new tokens. With async scheduling, a decode step (without logprobs)
        is launched before the previous one is read, so each call returns the tokens of the step before."""
        if self.inflight is None:
            batch = self.scheduler.schedule()
            if not batch:
                return []
            if not self._can_overlap(batch):
                tokens, logprobs = self.runner.run(batch)
                return self._finish_step(batch, tokens, logprobs)
            self.inflight = (batch, self.runner.launch_decode(batch))
        batch, pending = self.inflight
        ahead, keep = self._step_ahead(batch)
        self.inflight = (ahead, self.runner.launch_decode(ahead, pending.rows(keep))) if ahead else None
        tokens = pending.tolist()  # the GPU already has the next step queued
        return self._finish_step(batch, tokens, [None] * len(tokens))

    def _finish_step(self, batch, tokens, logprobs) -> list[RequestOutput]:
        live = [(item, tok, lp) for item, tok, lp in zip([i for i in batch if i.completes], tokens, logprobs)
                if not item.seq.is_finished]  # a request aborted or stopped while its step was in flight
        self.scheduler.advance([item for item in batch if not item.seq.is_finished])
        return [self._append(item.seq, tok, lp) for item, tok, lp in live]

    def _can_overlap(self, batch) -> bool:
        graphs = self.runner.graphs
        return (self.config.async_scheduling and graphs is not None and graphs.fits(batch)
                and all(item.seq.params.logprobs is None for item in batch))

    def _step_ahead(self, batch):
        """(the decode rows one token later, their indices in `batch`), or (None, None) if the batch may
        change before then: a request waits to be admitted, or a row has no KV slot. Rows that reach their
        length limit with the step in flight are left out (requests finish at different steps: waiting
        for each would make every such step synchronous); a row that stops on EOS is dropped later."""
        seqs = [item.seq for item in batch]
        if not self._can_overlap(batch) or self.scheduler.waiting or self.scheduler.running != seqs:
            return None, None
        keep = [i for i, seq in enumerate(seqs) if seq.num_completion_tokens + 2 <= seq.params.max_tokens
                and seq.num_tokens + 2 <= self.config.max_model_len]
        if not keep or not all(self.block_manager.grow(seqs[i], seqs[i].num_tokens + 1) for i in keep):
            return None, None
        return [ScheduledSeq(seqs[i], 1) for i in keep], keep

    def _append(self, seq: Sequence, token: int, logprobs: dict | None) -> RequestOutput:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        detok = self.requests[seq.request_id][1]
        hit_stop = detok.add(token)
        p = seq.params
        reason = None
        if hit_stop:
            reason = "stop"
        elif token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            reason = "stop"
        elif seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        return RequestOutput(seq.request_id, [token], detok.delta(reason is not None), reason is not None, reason,
                             [logprobs] if logprobs is not None else [], seq.num_prompt_tokens,
                             seq.num_completion_tokens)
