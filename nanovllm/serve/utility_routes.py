"""The routes besides generation that clients and tools expect: `GET /v1/models/{id}`, `GET /version`, and
vLLM's `POST /tokenize` / `POST /detokenize` (same request and response shapes)."""

from __future__ import annotations

import asyncio
from importlib import metadata
from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field, model_validator

from nanovllm.engine.prompts import encode_prompt
from nanovllm.serve.errors import APIError
from nanovllm.serve.prompts import ChatPrompt
from nanovllm.serve.protocol import ErrorResponse, ModelCard, _Request
from nanovllm.serve.state import ServeState

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 503)}


class TokenizeMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""


class TokenizeRequest(_Request):
    """Exactly one of `prompt` (text) and `messages` (rendered with the chat template first)."""
    model: str | None = None
    prompt: str | None = Field(None, min_length=1)
    messages: list[TokenizeMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, false for messages "
                                            "(the chat template adds its own)")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def _version() -> str:
    try:
        return metadata.version("nano-vllm")
    except metadata.PackageNotFoundError:
        return "unknown"


async def tokenize(state: ServeState, req: TokenizeRequest) -> TokenizeResponse:
    state.check_model(req.model)
    limits = state.prompts.limits
    try:
        if req.messages is not None:
            if not getattr(state.tokenizer, "chat_template", None):
                raise APIError(400, f"the model {state.model_name!r} has no chat template; send a prompt", "messages")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                        for m in req.messages]
            prompt = ChatPrompt(messages)  # rendered with the generation prompt, as a chat completion is
            if req.add_special_tokens:
                raise APIError(400, "add_special_tokens=true is not supported with messages: the chat template "
                               "adds the model's special tokens", "add_special_tokens")
            (ids,) = await state.prompts.encode([prompt])
        elif req.add_special_tokens is False:  # the shared encoder adds special tokens; this one call does not
            ids = await asyncio.to_thread(encode_prompt, state.tokenizer, req.prompt,
                                          max_model_len=limits.max_model_len, vocab_size=limits.vocab_size,
                                          chars_per_token=limits.chars_per_token, add_special_tokens=False)
        else:
            (ids,) = await state.prompts.encode([req.prompt])
    except ValueError as e:
        code = "context_length_exceeded" if "max_model_len" in str(e) else None
        raise APIError(400, str(e), "messages" if req.messages is not None else "prompt", code) from None
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len)


async def detokenize(state: ServeState, req: DetokenizeRequest) -> DetokenizeResponse:
    state.check_model(req.model)
    vocab = state.prompts.limits.vocab_size
    if len(req.tokens) > state.max_model_len:  # no prompt or output of this model is longer
        raise APIError(400, f"{len(req.tokens)} tokens is more than max_model_len={state.max_model_len}", "tokens")
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {req.tokens[bad]} at position {bad} is outside the vocabulary [0, {vocab})",
                       "tokens")
    text = await asyncio.to_thread(state.tokenizer.decode, req.tokens)
    return DetokenizeResponse(prompt=text)


def add_utility_routes(app: FastAPI, state: ServeState) -> None:
    @app.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses={404: {"model": ErrorResponse}, 401: {"model": ErrorResponse}})
    async def model(model_id: str):
        if model_id != state.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {state.model_name!r}",
                           "model", "model_not_found")
        return ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)

    @app.get("/version", response_model=VersionResponse)
    async def version():
        return VersionResponse(version=_version())

    @app.post("/tokenize", response_model=TokenizeResponse, responses={**_ERRORS, 404: {"model": ErrorResponse}})
    async def tokenize_route(req: TokenizeRequest):
        return await tokenize(state, req)

    @app.post("/detokenize", response_model=DetokenizeResponse,
              responses={**_ERRORS, 404: {"model": ErrorResponse}})
    async def detokenize_route(req: DetokenizeRequest):
        return await detokenize(state, req)
