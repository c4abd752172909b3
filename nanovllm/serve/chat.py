"""POST /v1/chat/completions: messages rendered by the model's chat template, n choices, whole or streamed.

Qwen3's thinking is switched with `chat_template_kwargs: {"enable_thinking": false}`, as in vLLM."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from fastapi import Request

from nanovllm.serve.errors import APIError
from nanovllm.serve.generation import Choices, cancel_on_disconnect, sse, sse_response
from nanovllm.serve.logprobs import chat_logprobs, prompt_logprobs
from nanovllm.serve.params import check_supported, sampling_params
from nanovllm.serve.prompts import ChatPrompt
from nanovllm.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
)
from nanovllm.serve.state import ServeState
from nanovllm.serve.structured import check_grammar, requested_output
from nanovllm.serve.tools import ToolCallStream, delta_chunks, finish_reason, parse_tool_calls, tool_setup

# apply_chat_template's own arguments: a request must not reach them (e.g. swap in its own template).
_RESERVED = {"conversation", "chat_template", "tokenize", "tools", "documents", "add_generation_prompt",
             "continue_final_message", "return_tensors", "return_dict", "return_assistant_tokens_mask",
             "tokenizer_kwargs", "padding", "truncation", "max_length"}


def chat_prompt(state: ServeState, req: ChatCompletionRequest, tools: list[dict] | None = None) -> ChatPrompt:
    """The request's messages, template variables and `tools` (listed by the template), checked; rendered off
    the event loop (serve/prompts.py)."""
    if not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, f"the model {state.model_name!r} has no chat template; use /v1/completions", "messages")
    kwargs = dict(req.chat_template_kwargs or {})
    plain = (str, int, float, bool, type(None))
    bad = sorted(k for k, v in kwargs.items() if k in _RESERVED or not isinstance(v, plain))
    if bad:
        raise APIError(400, f"chat_template_kwargs may not set {bad}: only plain template variables such as "
                       "enable_thinking are allowed", "chat_template_kwargs")
    messages = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:  # an assistant's calls, back into the template as it rendered them
            message["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    if tools is not None:
        kwargs["tools"] = tools
    return ChatPrompt(messages, kwargs)


async def create_chat_completion(req: ChatCompletionRequest, request: Request, state: ServeState):
    state.check_model(req.model)
    check_supported(req)
    n = req.n or 1
    max_tokens = req.max_completion_tokens or req.max_tokens or state.max_model_len
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = [sampling_params(req, max_tokens, top, j, state.prompts.limits.vocab_size) for j in range(n)]
    tools = tool_setup(req)
    grammar = requested_output(req)
    if tools.grammar is not None:
        if grammar is not None:
            raise APIError(400, f"tool_choice 'required' or a named function forces tool calls; it cannot be "
                           f"combined with {grammar[1]}", grammar[1])
        grammar = (tools.grammar, "tool_choice")
    if grammar is not None:
        await check_grammar(state, *grammar)
        params = [replace(p, structured=grammar[0]) for p in params]
    prompt = chat_prompt(state, req, tools.template_tools)
    echo = echo_text(req)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stream = await state.open(rid, [prompt], n, params, "messages")
    head = dict(id=rid, object="chat.completion.chunk", created=int(time.time()), model=state.model_name)
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return sse_response(_events(stream, head, state, n, top, usage, echo, tools.parse), stream)
    return await cancel_on_disconnect(request, _collect(stream, head, state, n, top, echo, tools.parse))


def echo_text(req: ChatCompletionRequest) -> str:
    """What `echo` prepends to each choice's content, as in vLLM: the last message's content when that message
    is the assistant's (the role of the reply, since the template always adds the generation prompt)."""
    last = req.messages[-1]
    if not req.echo or last.role != "assistant" or last.content is None:
        return ""
    return last.content if isinstance(last.content, str) else "\n".join(p.text for p in last.content)


async def _collect(stream, head: dict, state: ServeState, n: int, top: int | None, echo: str,
                   parse_tools: bool) -> ChatCompletionResponse:
    choices = Choices(n, n)
    try:
        async for i, out in stream:
            choices.add(i, out)
    finally:
        stream.close()
    plp = None
    if stream.params[0].prompt_logprobs is not None:  # one prompt: the same for every choice
        plp = prompt_logprobs(state.token_text, choices.prompt_token_ids[0] or [], choices.prompt_logprobs[0] or [])

    def choice(i: int) -> ChatChoice:
        content, calls = parse_tool_calls(choices.text[i]) if parse_tools else (choices.text[i], [])
        return ChatChoice(index=i, message=AssistantMessage(content=echo + content if echo else content,
                                                            tool_calls=calls or None),
                          finish_reason=finish_reason(choices.finish_reason[i], calls),
                          logprobs=None if top is None else ChatLogprobs(
                              content=chat_logprobs(state.token_text, choices.token_ids[i], choices.logprobs[i], top)))

    return ChatCompletionResponse(**{**head, "object": "chat.completion"}, usage=choices.usage(), prompt_logprobs=plp,
                                  choices=[choice(i) for i in range(n)])


async def _events(stream, head: dict, state: ServeState, n: int, top: int | None, include_usage: bool, echo: str,
                  parse_tools: bool):
    choices = Choices(n, n)
    calls = [ToolCallStream() if parse_tools else None for _ in range(n)]
    extra = {"usage": None} if include_usage else {}

    def chunk(i, delta, lp=None, reason=None):
        return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}],
                    **extra})

    for i in range(n):  # OpenAI opens each choice with the assistant role
        yield chunk(i, {"role": "assistant", "content": ""})
        if echo:
            yield chunk(i, {"content": echo})
    async for i, out in stream:
        choices.add(i, out)
        text, made = (out.text, []) if calls[i] is None else calls[i].feed(out.text, out.finished)
        if not (text or made or out.finished or out.logprobs):
            continue  # text held back (a partial character, a possible stop string or tool call)
        lp = None
        if top is not None and out.logprobs:
            tokens = chat_logprobs(state.token_text, out.token_ids, out.logprobs, top)
            lp = {"content": [t.model_dump() for t in tokens]}
        reason = out.finish_reason if out.finished else None
        if reason is not None and calls[i] is not None:
            reason = finish_reason(reason, [True] * calls[i].num_calls)
        if not made:
            yield chunk(i, {"content": text} if text else {}, lp, reason)
            continue
        if text or lp:
            yield chunk(i, {"content": text} if text else {}, lp)
        for index, call in made:
            for delta in delta_chunks(index, call):
                yield chunk(i, delta)
        if reason is not None:
            yield chunk(i, {}, None, reason)
    if include_usage:
        yield sse({**head, "choices": [], "usage": choices.usage().model_dump()})
