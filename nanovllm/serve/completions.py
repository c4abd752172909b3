"""POST /v1/completions: text (or token ids) in, n choices per prompt out, whole or streamed."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from fastapi import Request

from nanovllm.serve.generation import Choices, cancel_on_disconnect, sse, sse_response
from nanovllm.serve.logprobs import completion_logprobs
from nanovllm.serve.params import check_supported, sampling_params
from nanovllm.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
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
    params = [sampling_params(req, req.max_tokens or 16, req.logprobs, j) for _ in prompts for j in range(n)]
    grammar = requested_output(req)  # guided_json, structured_outputs, ...
    if grammar is not None:
        await check_grammar(state, *grammar)
        params = [replace(p, structured=grammar[0]) for p in params]
    rid = f"cmpl-{uuid.uuid4().hex}"
    stream = await state.open(rid, prompts, n, params, "prompt")
    head = dict(id=rid, object="text_completion", created=int(time.time()), model=state.model_name)
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return sse_response(_events(stream, head, state, n, usage), stream)
    return await cancel_on_disconnect(request, _collect(stream, head, state, n))


async def _collect(stream, head: dict, state: ServeState, n: int) -> CompletionResponse:
    choices = Choices(len(stream.ids), n)
    try:
        async for i, out in stream:
            choices.add(i, out)
    finally:
        stream.close()
    want_lp = stream.params[0].logprobs is not None
    return CompletionResponse(**head, usage=choices.usage(), choices=[
        CompletionChoice(index=i, text=choices.text[i], finish_reason=choices.finish_reason[i],
                         logprobs=completion_logprobs(state.token_text, choices.token_ids[i], choices.logprobs[i], 0)
                         if want_lp else None)
        for i in range(len(stream.ids))])


async def _events(stream, head: dict, state: ServeState, n: int, include_usage: bool):
    choices = Choices(len(stream.ids), n)
    extra = {"usage": None} if include_usage else {}
    async for i, out in stream:
        offset = len(choices.text[i])
        choices.add(i, out)
        if not (out.text or out.finished or out.logprobs):
            continue  # text held back (a partial character or a possible stop string)
        lp = None
        if out.logprobs:
            lp = completion_logprobs(state.token_text, out.token_ids, out.logprobs, offset).model_dump()
        yield sse({**head, "choices": [{"index": i, "text": out.text, "logprobs": lp,
                                        "finish_reason": out.finish_reason}], **extra})
    if include_usage:
        yield sse({**head, "choices": [], "usage": choices.usage().model_dump()})
