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
    presence_penalty: float = 0.0     # in [-2, 2]: subtracted once from each token already in the output
    frequency_penalty: float = 0.0    # in [-2, 2]: subtracted per occurrence in the output
    repetition_penalty: float = 1.0   # > 0: tokens of the prompt or output get positive logits divided by it,
    #                                   negative ones multiplied (1 disables)
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100] added to its logit
    min_tokens: int = 0               # EOS and stop token ids are masked, stop strings unchecked, until this many
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text
    prompt_logprobs: int | None = None  # per prompt token: its logprob and this many top alternatives
    truncate_prompt_tokens: int | None = None  # keep only the last this many prompt tokens
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                bad(name, value, "it must be a number in [-2, 2]")
        if isinstance(self.repetition_penalty, bool) or not isinstance(self.repetition_penalty, (int, float)) \
                or not 0 < self.repetition_penalty <= 100:
            bad("repetition_penalty", self.repetition_penalty, "it must be a number in (0, 100] (1 disables it)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or any(
                    isinstance(t, bool) or not isinstance(t, int) or t < 0 or isinstance(b, bool)
                    or not isinstance(b, (int, float)) or not -100 <= b <= 100 for t, b in self.logit_bias.items()):
                bad("logit_bias", self.logit_bias, "it must map non-negative token ids to biases in [-100, 100]")
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items() if b != 0} or None
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "it must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"it must be at most max_tokens={self.max_tokens}")
        if not isinstance(self.include_stop_str_in_output, bool):
            bad("include_stop_str_in_output", self.include_stop_str_in_output, "it must be True or False")
        if self.prompt_logprobs is not None and (isinstance(self.prompt_logprobs, bool) or not isinstance(
                self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", self.prompt_logprobs, "it must be None or an integer in [0, 20]")
        if self.truncate_prompt_tokens is not None and (isinstance(self.truncate_prompt_tokens, bool) or not isinstance(
                self.truncate_prompt_tokens, int) or self.truncate_prompt_tokens < 1):
            bad("truncate_prompt_tokens", self.truncate_prompt_tokens, "it must be None or an integer >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a presence, frequency or repetition penalty changes this request's logits."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
