"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}` with a
4xx/5xx status, including FastAPI's own validation errors and unknown routes. Every 429 and 503 carries
`Retry-After` (seconds) and every 405 the `Allow` header naming the route's methods."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("nanovllm.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
RETRY_AFTER_S = {429: 1, 503: 5}  # the Retry-After of an answer with this status that names none itself


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    e = APIError(status, message, param, code, type)
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_headers(status: int, headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """`headers` plus the Retry-After that every 429 and 503 carries."""
    if status in RETRY_AFTER_S and not any(k.lower() == "retry-after" for k in headers or {}):
        return {**(headers or {}), "Retry-After": str(RETRY_AFTER_S[status])}
    return headers


def error_json(status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=error_headers(status, headers))


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.type), status_code=e.status,
                        headers=error_headers(e.status, e.headers))


_SCALAR_TAGS = {"str", "int", "float", "bool", "none", "bytes"}


def _is_union_tag(part: str) -> bool:
    """pydantic puts the union member it tried into the location (`stop.list[str]`, `content.TextPart`);
    API fields are snake_case, so type-like parts are those tags (`constrained-str` for a str with bounds)."""
    return part in _SCALAR_TAGS or "[" in part or "-" in part or part[:1].isupper()


def _param(loc) -> str | None:
    """`("body", "messages", 0, "content", "str")` -> `messages[0].content`."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def validation_message(errors) -> tuple[str, str | None]:
    """A readable message and the offending parameter from pydantic/FastAPI error dicts."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON in the request body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    bad_text = next((e for e in errors if "unicode string" in str(e.get("msg"))), None)
    if bad_text is not None:  # the other union members' complaints would only hide this one
        where = _param(bad_text.get("loc", ()))
        return f"{where} is not valid Unicode (a lone UTF-16 surrogate cannot be encoded)", where
    parts = []
    for e in errors[:5]:
        where = _param(e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more, _param(first.get("loc", ()))


def install_error_handlers(app: FastAPI, on_reject=None) -> None:
    """`on_reject(status)` is told of every 4xx (for the metrics)."""

    def respond(status, message, param=None, code=None, headers=None):
        if on_reject is not None and 400 <= status < 500:
            on_reject(status)
        return error_json(status, message, param, code, headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if on_reject is not None and 400 <= e.status < 500:
            on_reject(e.status)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return respond(400, message, param, "invalid_json" if "malformed JSON" in message else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow")
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        return respond(e.status_code, message, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal server error: {type(e).__name__}"), status_code=500)
