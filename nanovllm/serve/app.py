"""The FastAPI app: OpenAI-compatible routes, /health, /metrics, optional API key, OpenAI-style errors.

`create_app(engine, ...)` wraps an LLMEngine; the app's lifespan starts the engine thread and stops it.
`app.state.drain()` is graceful shutdown (nanovllm/serve/server.py calls it on SIGTERM): /health turns 503,
new requests get 503 with Retry-After, running ones get `shutdown_grace_s` seconds to finish.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.serve.async_engine import AsyncEngine, RequestFailedError
from nanovllm.serve.chat import create_chat_completion
from nanovllm.serve.completions import create_completion
from nanovllm.serve.errors import error_body, error_json, install_error_handlers
from nanovllm.serve.metrics import Metrics
from nanovllm.serve.prompts import PromptEncoder
from nanovllm.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from nanovllm.serve.state import ServeState
from nanovllm.serve.utility_routes import add_utility_routes

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
# generation also answers 501 to a constrained request when the grammar library does not import
_GENERATION_ERRORS = {**_ERRORS, 501: {"model": ErrorResponse}}


def _needs_key(path: str) -> bool:
    return path.startswith("/v1") or path in ("/tokenize", "/detokenize")


class APIKeyMiddleware:
    """Pure ASGI (unlike BaseHTTPMiddleware it leaves streaming and disconnects alone): /v1/*, /tokenize and
    /detokenize need `Authorization: Bearer <key>`; /health, /metrics and /version stay open for probes and
    scrapers."""

    def __init__(self, app, api_key: str, on_reject):
        self.app, self.expected, self.on_reject = app, f"Bearer {api_key}".encode(), on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _needs_key(scope["path"]) and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.on_reject(401)
                body = error_body(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Pure ASGI: a request body over `max_bytes` gets 413, from its Content-Length before anything is read, or
    as soon as a streamed (chunked) body passes the limit, so an oversized body is never held in memory whole."""

    def __init__(self, app, max_bytes: int, on_reject):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    def _message(self) -> str:
        return f"the request body exceeds {self.max_bytes} bytes (the server's max_body_bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            self.on_reject(413)
            body = error_body(413, self._message(), code="request_too_large")
            return await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # answered by the app's HTTPException handler
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)


def create_app(engine: LLMEngine, model_name: str, api_key: str | None = None,
               max_queued_requests: int = 256, max_body_bytes: int = 4 << 20, shutdown_grace_s: float = 30.0,
               max_step_failures: int = 3) -> FastAPI:
    metrics = Metrics(model_name, engine.config.max_model_len)
    memory = getattr(getattr(engine, "runner", None), "memory", None)  # a local engine's (not a replica front's)
    if memory is not None:
        metrics.set_memory(memory)
    async_engine = AsyncEngine(engine, metrics, max_queued_requests, max_step_failures)
    prompts = PromptEncoder(engine.tokenizer, engine.model_path, engine.config.max_model_len, engine.vocab_size)
    state = ServeState(async_engine, model_name, engine.config.max_model_len, engine.tokenizer, prompts)

    closers = [prompts.close]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()
            for close in closers:
                close()

    app = FastAPI(title="nano-vllm", summary="OpenAI-compatible completions and chat completions",
                  lifespan=lifespan)
    app.state.serve, app.state.metrics = state, metrics

    async def drain() -> None:
        await async_engine.drain(shutdown_grace_s)

    app.state.drain = drain

    def on_reject(status: int) -> None:
        metrics.requests.labels("rejected").inc()

    install_error_handlers(app, on_reject)

    @app.exception_handler(RequestFailedError)
    async def _request_failed(request: Request, e: RequestFailedError):
        return error_json(e.status, str(e), code=e.code)

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, on_reject=on_reject)
    if api_key:  # added last, so it runs first: a request without the key is refused before its body is read
        app.add_middleware(APIKeyMiddleware, api_key=api_key, on_reject=on_reject)

    @app.get("/health", summary="200 while the engine runs; 503 once it has failed or the server is shutting down",
             responses={503: {"model": ErrorResponse}})
    async def health():
        if async_engine.draining:
            return error_json(503, "the server is shutting down", code="server_shutting_down")
        if async_engine.alive:
            return {"status": "ok"}
        return error_json(503, f"the engine is not running: {async_engine.error!r}", code="engine_dead")

    @app.get("/metrics", summary="Prometheus metrics (docs/deployment.md)", response_class=PlainTextResponse)
    async def prometheus():
        return Response(metrics.render(async_engine.stats), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=state.created, max_model_len=state.max_model_len)])

    @app.post("/v1/completions", response_model=None,
              responses={200: {"model": CompletionResponse, "description": "or an SSE stream when stream=true"},
                         **_GENERATION_ERRORS})
    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(req, request, state)

    @app.post("/v1/chat/completions", response_model=None,
              responses={200: {"model": ChatCompletionResponse, "description": "or an SSE stream of "
                               "chat.completion.chunk when stream=true"}, **_GENERATION_ERRORS})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await create_chat_completion(req, request, state)

    closers.append(add_utility_routes(app, state, engine.model_path).close)
    return app
