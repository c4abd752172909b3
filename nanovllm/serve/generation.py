"""Shared by the completion and chat handlers: SSE framing, per-choice accumulation, usage, and
cancelling a non-streaming request whose client went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from nanovllm.engine.llm_engine import RequestOutput
from nanovllm.serve.async_engine import RequestFailedError, RequestStream
from nanovllm.serve.errors import error_body
from nanovllm.serve.protocol import SpeculativeUsage, Usage

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering (nginx)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_response(events: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
    """Stream `events`, then `[DONE]`. Closing the stream aborts unfinished requests: Starlette cancels
    the body when the client disconnects, and the background task covers a body that never started."""

    async def body():
        try:
            async for event in events:
                yield event
        except RequestFailedError as e:  # a failed step, the engine stopping, or shutdown after the grace period
            yield sse(error_body(e.status, str(e), code=e.code))
        finally:
            stream.close()
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS,
                             background=BackgroundTask(stream.close))


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`; if the client disconnects first, cancel it (its stream aborts, freeing KV blocks)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Choices:
    """Accumulates the outputs of k = prompts x n choices."""

    def __init__(self, k: int, n: int):
        self.n = n
        self.text = [""] * k
        self.token_ids: list[list[int]] = [[] for _ in range(k)]
        self.logprobs: list[list[dict]] = [[] for _ in range(k)]
        self.finish_reason: list[str | None] = [None] * k
        self.prompt_tokens = [0] * k
        self.completion_tokens = [0] * k
        self.prompt_token_ids: list[list[int] | None] = [None] * k   # from each choice's first output
        self.prompt_logprobs: list[list | None] = [None] * k
        self.spec: list[tuple[int, int, int]] = [(0, 0, 0)] * k  # (verify steps, drafted, kept) per choice

    def add(self, i: int, out: RequestOutput) -> None:
        self.text[i] += out.text
        self.token_ids[i] += out.token_ids
        self.logprobs[i] += out.logprobs
        self.prompt_tokens[i] = out.num_prompt_tokens
        self.completion_tokens[i] = out.num_completion_tokens
        self.spec[i] = (out.spec_steps, out.spec_draft_tokens, out.spec_accepted_tokens)
        if out.prompt_token_ids is not None:
            self.prompt_token_ids[i], self.prompt_logprobs[i] = out.prompt_token_ids, out.prompt_logprobs
        if out.finished:
            self.finish_reason[i] = out.finish_reason

    def usage(self) -> Usage:
        """A prompt counts once however many choices (n) it has, as in OpenAI's API."""
        prompt = sum(self.prompt_tokens[::self.n])
        completion = sum(self.completion_tokens)
        steps, drafted, kept = (sum(col) for col in zip(*self.spec))
        spec = None if not steps else SpeculativeUsage(num_drafts=steps, num_draft_tokens=drafted,
                                                       num_accepted_tokens=kept,
                                                       mean_accepted_length=1 + kept / steps)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     speculative_decoding=spec)
