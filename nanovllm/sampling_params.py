"""Per-request sampling settings, validated on construction so bad values never reach the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanovllm.structured.spec import StructuredOutput


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 is greedy
    top_p: float = 1.0                # in (0, 1]; 1 disables
    top_k: int = -1                   # -1 or 0 disables
    min_p: float = 0.0                # in [0, 1]; 0 disables
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None       # return the sampled token's logprob and this many top alternatives
    detokenize: bool = True           # False: token ids only, no text (the host skips detokenizing each token)
    structured: StructuredOutput | None = None  # the output must match this grammar (JSON schema, regex, ...)

    def __post_init__(self):
        def bad(name, value, want):
            raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {want}")

        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", self.temperature, "it must be a number >= 0 (0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "it must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", self.top_k, "it must be an integer >= -1 (-1 or 0 disables it)")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "it must be in [0, 1]")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "it must be an integer >= 1")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", self.logprobs, "it must be None or an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "it must be an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "it must be a non-empty string or a list of non-empty strings")
        if not isinstance(self.detokenize, bool):
            bad("detokenize", self.detokenize, "it must be True or False")
        if self.stop and not self.detokenize:
            bad("detokenize", self.detokenize, "stop strings are matched on the text: keep it True with `stop`")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            bad("structured", self.structured, "it must be a nanovllm.structured.StructuredOutput or None")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "it must be a list of non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
