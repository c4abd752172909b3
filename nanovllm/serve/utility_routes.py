"""The routes besides generation that clients and tools expect: `GET /v1/models/{id}`, `GET /version`, and
vLLM's `POST /tokenize` / `POST /detokenize` (same request and response shapes)."""

from __future__ import annotations

import asyncio
from importlib import metadata
from typing import Annotated, Literal

from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, create_model

from nanovllm.serve.errors import APIError
from nanovllm.serve.prompts import ChatPrompt, PromptEncoder
from nanovllm.serve.protocol import ErrorResponse, ModelCard, _Request
from nanovllm.serve.state import ServeState

UNBOUNDED_LEN = 1 << 62  # /tokenize counts tokens beyond max_model_len (the body-size limit bounds the text)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 503)}


class _Strict(_Request):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a field this route does not know is a 400


class TokenizeMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str = Field(..., min_length=1)
    add_special_tokens: StrictBool = True


class TokenizeChatRequest(_Strict):
    """The messages rendered with the chat template and its generation prompt, as a chat completion is."""
    model: str | None = None
    messages: list[TokenizeMessage] = Field(..., min_length=1)
    add_special_tokens: StrictBool = Field(False, description="the chat template adds the model's special tokens "
                                           "already")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def _json_integer(value):
    """An integer as JSON Schema has it: 3 or 3.0, never true or "3"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError("must be an integer token id")
    return int(value)


def detokenize_request(vocab_size: int, max_model_len: int) -> type[_Strict]:
    """The /detokenize body of this model: its vocabulary bounds each id, max_model_len the count (the schema
    says so, so every schema-valid request is answered)."""
    token = Annotated[int, Field(ge=0, lt=vocab_size), BeforeValidator(_json_integer)]
    return create_model("DetokenizeRequest", __base__=_Strict, model=(str | None, None),
                        tokens=(list[token], Field(..., max_length=max_model_len)))


def _version() -> str:
    try:
        return metadata.version("nano-vllm")
    except metadata.PackageNotFoundError:
        return "unknown"


class SpecialTokens:
    """The ids a tokenizer puts before and after a text when asked to add special tokens (BOS, EOS), found
    once by encoding a probe both ways, so they can be added to or removed from ids encoded the other way."""

    def __init__(self, tokenizer, probe: str = "a"):
        with_special = tokenizer.encode(probe, add_special_tokens=True)
        plain = tokenizer.encode(probe, add_special_tokens=False)
        at = next((i for i in range(len(with_special) - len(plain) + 1)
                   if with_special[i:i + len(plain)] == plain), 0)
        self.prefix, self.suffix = with_special[:at], with_special[at + len(plain):]

    def add(self, ids: list[int]) -> list[int]:
        return [*self.prefix, *ids, *self.suffix]

    def remove(self, ids: list[int]) -> list[int]:
        start = len(self.prefix) if ids[:len(self.prefix)] == self.prefix else 0
        end = len(ids) - len(self.suffix) if self.suffix and ids[-len(self.suffix):] == self.suffix else len(ids)
        return ids[start:end]


async def tokenize(state: ServeState, encoder: PromptEncoder, special: SpecialTokens,
                   req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    """`encoder` checks no token count (the response's max_model_len lets the client compare); it tokenizes
    off the event loop, large texts in a worker process, as for generation."""
    state.check_model(req.model)
    chat = isinstance(req, TokenizeChatRequest)
    try:
        if chat:
            if not getattr(state.tokenizer, "chat_template", None):
                raise APIError(400, f"the model {state.model_name!r} has no chat template; send a prompt", "messages")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                        for m in req.messages]
            (ids,) = await encoder.encode([ChatPrompt(messages)])  # the template's special tokens, no others
            ids = special.add(ids) if req.add_special_tokens else ids
        else:
            (ids,) = await encoder.encode([req.prompt])  # with special tokens
            ids = ids if req.add_special_tokens else special.remove(ids)
    except ValueError as e:
        raise APIError(400, str(e), "messages" if chat else "prompt") from None
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len)


def add_utility_routes(app: FastAPI, state: ServeState, model_path) -> PromptEncoder:
    """Adds the routes; returns /tokenize's encoder, for the app to close on shutdown."""
    limits = state.prompts.limits
    encoder = PromptEncoder(state.tokenizer, model_path, UNBOUNDED_LEN, limits.vocab_size)
    special = SpecialTokens(state.tokenizer)

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

    @app.post("/tokenize", response_model=TokenizeResponse, responses={**_ERRORS, 404: {"model": ErrorResponse}},
              summary="Token ids of a prompt, or of chat messages rendered with the chat template")
    async def tokenize_route(req: TokenizeCompletionRequest | TokenizeChatRequest):
        return await tokenize(state, encoder, special, req)

    async def detokenize_route(req):
        state.check_model(req.model)
        text = await asyncio.to_thread(state.tokenizer.decode, req.tokens)
        return DetokenizeResponse(prompt=text)

    # the body's model is made per app (its bounds are this model's), so it is set here, not written above
    detokenize_route.__annotations__["req"] = detokenize_request(state.prompts.limits.vocab_size, state.max_model_len)
    app.post("/detokenize", response_model=DetokenizeResponse, responses={**_ERRORS, 404: {"model": ErrorResponse}},
             summary="The text of token ids")(detokenize_route)
    return encoder
