"""From an API request to nano-vllm SamplingParams, refusing what the engine does not support.

Every field of OpenAI's completion and chat schemas and of vLLM's extra sampling fields is either honoured
or answered with a 400 that names it (tests/serve/test_every_request_field.py lists them all). A field that
is not declared in serve/protocol.py arrives as a pydantic extra; those this server knows it cannot honour
are in REFUSED, with the values that mean "off" and are therefore accepted.
"""

from __future__ import annotations

import re

from nanovllm.sampling_params import SamplingParams
from nanovllm.serve.errors import APIError
from nanovllm.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

# name -> (values that leave the feature off, why it is refused). Any other value is a 400 naming the field.
REFUSED: dict[str, tuple[tuple, str]] = {
    # OpenAI
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only the 'text' modality is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported; use chat_template_kwargs "
                                  '{"enable_thinking": false} to switch off a Qwen3 model\'s thinking'),
    "verbosity": ((None,), "verbosity is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "store": ((None, False), "this server stores no completions"),
    "metadata": ((None,), "metadata is for stored completions, and this server stores none"),
    "service_tier": ((None, "auto", "default"), "this server has one service tier"),
    "functions": ((None,), "legacy function calling (functions) is not supported"),
    "function_call": ((None, "none"), "legacy function calling (function_call) is not supported"),
    # vLLM's extra fields
    "use_beam_search": ((None, False), "beam search is not supported"),
    "length_penalty": ((None, 1, 1.0), "length_penalty applies to beam search, which is not supported"),
    "early_stopping": ((None, False), "early_stopping applies to beam search, which is not supported"),
    "allowed_token_ids": ((None,), "allowed_token_ids is not supported; logit_bias can favour tokens"),
    "bad_words": ((None, []), "bad_words is not supported"),
    "skip_special_tokens": ((None, True), "special tokens are always skipped in the output text"),
    "spaces_between_special_tokens": ((None, True), "spaces_between_special_tokens=false is not supported"),
    "add_special_tokens": ((None,), "completions add the tokenizer's special tokens (true) and chat prompts "
                                    "take theirs from the template (false); the other choice is not supported"),
    "add_generation_prompt": ((None, True), "the chat template always ends with the generation prompt"),
    "continue_final_message": ((None, False), "continue_final_message is not supported"),
    "chat_template": ((None,), "a request may not set its own chat template"),
    "documents": ((None,), "documents are not supported"),
    "mm_processor_kwargs": ((None,), "multimodal inputs are not supported"),
    "media_io_kwargs": ((None,), "multimodal inputs are not supported"),
    "prompt_embeds": ((None,), "prompt embeddings are not supported"),
    "logits_processors": ((None,), "custom logits processors are not supported"),
    "return_tokens_as_token_ids": ((None, False), "return_tokens_as_token_ids is not supported"),
    "return_token_ids": ((None, False), "return_token_ids is not supported"),
    "priority": ((None, 0), "request priorities are not supported (requests are served in arrival order)"),
    "cache_salt": ((None,), "cache_salt is not supported"),
    "kv_transfer_params": ((None,), "KV transfer is not supported"),
    "vllm_xargs": ((None,), "vllm_xargs is not supported"),
    "request_id": ((None,), "request_id is not supported: the server names each request"),
    "thinking_token_budget": ((None,), "thinking_token_budget is not supported"),
}


# The values of a REFUSED field that each endpoint honours (what it does anyway).
HONOURED_AS_IS = {CompletionRequest: {"add_special_tokens": True}, ChatCompletionRequest: {"add_special_tokens": False}}


def check_supported(req: SamplingFields) -> None:
    """A 400 naming the field beats silently ignoring a feature the client relies on."""
    as_is = HONOURED_AS_IS.get(type(req), {})
    for name, value in (req.model_extra or {}).items():
        if name in REFUSED:
            off, why = REFUSED[name]
            off = off + ((as_is[name],) if name in as_is else ())
            if not any(value == v and type(value) is type(v) or value is v for v in off):
                raise APIError(400, f"{name}={value!r} is not supported: {why}", name)
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "prompt_logprobs is not available with stream=true", "prompt_logprobs")
    if isinstance(req, CompletionRequest):
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


def logit_bias(req: SamplingFields, vocab_size: int) -> dict[int, float] | None:
    """The request's logit_bias with integer keys, checked against the vocabulary (a 400 naming the bad ids)."""
    if not req.logit_bias:
        return None
    bad, out = [], {}
    for key, bias in req.logit_bias.items():
        token = int(key) if re.fullmatch(r"\d+", key.strip()) else None
        if token is None or token >= vocab_size:
            bad.append(key)
        else:
            out[token] = bias
    if bad:
        raise APIError(400, f"logit_bias names token ids outside the vocabulary [0, {vocab_size}): {bad}",
                       "logit_bias")
    return out


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, choice: int,
                    vocab_size: int, prompt_logprobs: int | None = None) -> SamplingParams:
    """Params of choice `choice` (0..n-1): with a seed, choice j samples with seed+j so that the n choices
    differ yet the request stays reproducible. `prompt_logprobs`: overrides the request's (completions' echo
    with logprobs asks for them)."""
    seed = req.seed if req.seed is None or choice == 0 else (req.seed + choice) % 2**64
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            max_tokens=max_tokens, ignore_eos=req.ignore_eos, stop=req.stop,
            stop_token_ids=list(req.stop_token_ids or []), seed=seed, logprobs=logprobs,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=logit_bias(req, vocab_size), min_tokens=req.min_tokens or 0,
            include_stop_str_in_output=req.include_stop_str_in_output,
            prompt_logprobs=req.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            truncate_prompt_tokens=req.truncate_prompt_tokens)
    except ValueError as e:  # SamplingParams.<name>=... is invalid: ...
        m = re.match(r"SamplingParams\.(\w+)", str(e))
        raise APIError(400, str(e), m.group(1) if m else None) from None
