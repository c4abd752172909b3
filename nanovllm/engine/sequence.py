"""A request's token stream and its progress through the engine."""

from __future__ import annotations

from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Tokens [0, num_computed_tokens) have K/V in the cache; the rest are computed by coming steps.

    A decoding sequence has exactly one uncomputed token: the one sampled last.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0     # leading full blocks registered in the prefix cache
        self.swapped_blocks: list[int] = []  # host-tier slots of its computed blocks while swapped out (preempted)
        self.params = params
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator = None          # torch.Generator when params.seed is set (made by the runner)
        self.logprobs: list[dict] = []
        # Token ids masked while fewer than params.min_tokens are generated (the engine sets them: EOS unless
        # ignore_eos, and params.stop_token_ids, within the vocabulary).
        self.min_tokens_stop_ids: frozenset[int] = frozenset()
        # With params.prompt_logprobs: None for the first prompt token, then one entry per prompt token whose
        # logits (those of the position before it) have been computed.
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs is not None else None
        self.matcher = None            # xgrammar GrammarMatcher when params.structured is set (made by the engine)
        # Speculative decoding: verify steps with drafts, drafted tokens, and those the target kept.
        self.spec_steps = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def reusable_prefix_tokens(self) -> int:
        """Leading tokens whose K/V may come from the prefix cache: all of them, unless the request still needs
        prompt logprobs, whose logits exist only where the prompt is computed."""
        pending = self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens
        return len(self.prompt_logprobs) - 1 if pending else self.num_tokens

    def block_tokens(self, i: int, block_size: int) -> tuple[int, ...]:
        return tuple(self.token_ids[i * block_size:(i + 1) * block_size])
