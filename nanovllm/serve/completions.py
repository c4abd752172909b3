"""POST /v1/completions: text (or token ids) in, n choices per prompt out, whole or streamed."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from fastapi import Request

from nanovllm.serve.generation import Choices, cancel_on_disconnect, sse, sse_response
from nanovllm.serve.logprobs import completion_logprobs, echo_logprobs, prompt_logprobs
from nanovllm.serve.params import check_supported, sampling_params
from nanovllm.serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from nanovllm.serve.state import ServeState
from nanovllm.serve.structured import check_grammar, requested_output


def _prompts(prompt) -> list:
    """One prompt (text or ids) or a batch of them -> a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt) if prompt else [prompt]


async def create_completion(req: CompletionRequest, request: Request, state: ServeState):
    state.check_model(req.model)
    check_supported(req)
    n = req.n or 1
    prompts = _prompts(req.prompt)
    # Echo with logprobs shows the prompt tokens' logprobs too: the engine computes them from the prefill.
    echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
    plp = max(req.prompt_logprobs or 0, echo_lp) if echo_lp is not None else None
    vocab = state.prompts.limits.vocab_size
    params = [sampling_params(req, req.max_tokens or 16, req.logprobs, j, vocab, plp) for _ in prompts
              for j in range(n)]
    grammar = requested_output(req)  # guided_json, structured_outputs, ...
    if grammar is not None:
        await check_grammar(state, *grammar)
        params = [replace(p, structured=grammar[0]) for p in params]
    rid = f"cmpl-{uuid.uuid4().hex}"
    stream = await state.open(rid, prompts, n, params, "prompt")
    head = dict(id=rid, object="text_completion", created=int(time.time()), model=state.model_name)
    echo = Echo(req, prompts, n, state)
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return sse_response(_events(stream, head, state, n, usage, echo), stream)
    return await cancel_on_disconnect(request, _collect(stream, head, state, n, echo))


class Echo:
    """What an echoed choice starts with: its prompt's text (the request's own text, else the prompt ids
    decoded) and, with logprobs, the prompt tokens' logprobs."""

    def __init__(self, req: CompletionRequest, prompts: list, n: int, state: ServeState):
        self.on, self.n, self.state = req.echo, n, state
        self.top = req.logprobs
        self.prompts = prompts
        self.truncated = req.truncate_prompt_tokens is not None

    def text(self, i: int, prompt_ids: list[int]) -> str:
        prompt = self.prompts[i // self.n]
        if isinstance(prompt, str) and not self.truncated:
            return prompt
        return self.state.tokenizer.decode(prompt_ids, skip_special_tokens=False)

    def logprobs(self, prompt_ids: list[int], entries: list | None) -> CompletionLogprobs | None:
        if self.top is None:
            return None
        return echo_logprobs(self.state.token_text, prompt_ids, entries or [None] * len(prompt_ids), self.top)


def _join(first: CompletionLogprobs | None, then: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if first is None or then is None:
        return first or then
    return CompletionLogprobs(**{k: getattr(first, k) + getattr(then, k) for k in CompletionLogprobs.model_fields})


async def _collect(stream, head: dict, state: ServeState, n: int, echo: Echo) -> CompletionResponse:
    choices = Choices(len(stream.ids), n)
    try:
        async for i, out in stream:
            choices.add(i, out)
    finally:
        stream.close()
    params = stream.params[0]
    want_lp, want_plp = params.logprobs is not None, params.prompt_logprobs is not None
    out = []
    for i in range(len(stream.ids)):
        text, ids = choices.text[i], choices.prompt_token_ids[i] or []
        prefix = echo.text(i, ids) if echo.on else ""
        lp = completion_logprobs(state.token_text, choices.token_ids[i], choices.logprobs[i], len(prefix)) \
            if want_lp else None
        if echo.on:
            lp = _join(echo.logprobs(ids, choices.prompt_logprobs[i]), lp)
        out.append(CompletionChoice(
            index=i, text=prefix + text, finish_reason=choices.finish_reason[i], logprobs=lp,
            prompt_logprobs=prompt_logprobs(state.token_text, ids, choices.prompt_logprobs[i]) if want_plp else None))
    return CompletionResponse(**head, usage=choices.usage(), choices=out)


async def _events(stream, head: dict, state: ServeState, n: int, include_usage: bool, echo: Echo):
    choices = Choices(len(stream.ids), n)
    extra = {"usage": None} if include_usage else {}
    echoed = [0] * len(stream.ids)  # characters of echoed prompt text before each choice's own text
    async for i, out in stream:
        offset = echoed[i] + len(choices.text[i])
        choices.add(i, out)
        if echo.on and out.prompt_token_ids is not None:  # the choice's first output: its prompt goes first
            prefix = echo.text(i, out.prompt_token_ids)
            lp = echo.logprobs(out.prompt_token_ids, out.prompt_logprobs)
            echoed[i] = offset = len(prefix)
            yield sse({**head, "choices": [{"index": i, "text": prefix, "logprobs": lp and lp.model_dump(),
                                            "finish_reason": None}], **extra})
        if not (out.text or out.finished or out.logprobs):
            continue  # text held back (a partial character or a possible stop string)
        lp = None
        if out.logprobs:
            lp = completion_logprobs(state.token_text, out.token_ids, out.logprobs, offset).model_dump()
        yield sse({**head, "choices": [{"index": i, "text": out.text, "logprobs": lp,
                                        "finish_reason": out.finish_reason}], **extra})
    if include_usage:
        yield sse({**head, "choices": [], "usage": choices.usage().model_dump()})
