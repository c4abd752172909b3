"""From an API request to nano-vllm SamplingParams, refusing what the engine does not support."""

from __future__ import annotations

import re

from nanovllm.sampling_params import SamplingParams
from nanovllm.serve.errors import APIError
from nanovllm.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


def check_supported(req: SamplingFields) -> None:
    """A 400 naming the field beats silently ignoring a feature the client relies on."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by this server; leave it unset or 0", name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise APIError(400, "echo is not supported by this server", "echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise APIError(400, "best_of must equal n (or be unset): ranking candidates is not supported",
                           "best_of")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    """Params of choice `choice` (0..n-1): with a seed, choice j samples with seed+j so that the n choices
    differ yet the request stays reproducible."""
    seed = req.seed if req.seed is None or choice == 0 else (req.seed + choice) % 2**64
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            max_tokens=max_tokens, ignore_eos=req.ignore_eos, stop=req.stop,
            stop_token_ids=list(req.stop_token_ids or []), seed=seed, logprobs=logprobs)
    except ValueError as e:  # SamplingParams.<name>=... is invalid: ...
        m = re.match(r"SamplingParams\.(\w+)", str(e))
        raise APIError(400, str(e), m.group(1) if m else None) from None
