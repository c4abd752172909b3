"""Structured-output fields of a request -> one StructuredOutput, compiled (and so checked) off the event loop
before the request reaches the engine.

OpenAI's `response_format` (json_object, json_schema) and vLLM's `structured_outputs` / `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` each set the grammar; a request may set only one of them."""

from __future__ import annotations

import asyncio

from nanovllm.serve.errors import APIError
from nanovllm.serve.protocol import ChatCompletionRequest, SamplingFields
from nanovllm.serve.state import ServeState
from nanovllm.structured import StructuredOutput
from nanovllm.structured.grammars import GrammarUnavailable

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def requested_output(req: SamplingFields) -> tuple[StructuredOutput, str] | None:
    """(the grammar the request asks for, the parameter that asked) or None; a 400 naming the parameter when
    it is malformed or a second one is given."""
    given: list[tuple[str, dict]] = []
    fmt = getattr(req, "response_format", None) if isinstance(req, ChatCompletionRequest) else None
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format of type 'json_schema' needs a json_schema object "
                           "({'name': ..., 'schema': {...}})", "response_format")
        given.append(("response_format", {"json": fmt.json_schema.schema_}))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        fields = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                    ("grammar", so.grammar), ("json_object", so.json_object)) if v}
        given.append(("structured_outputs", fields))
    for name, kind in _GUIDED.items():
        if getattr(req, name) is not None:
            given.append((name, {kind: getattr(req, name)}))
    if not given:
        return None
    if len(given) > 1:
        names = [name for name, _ in given]
        raise APIError(400, f"give one way to constrain the output, not {names}", names[1])
    param, fields = given[0]
    try:
        return StructuredOutput(**fields), param
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param) from None


async def check_grammar(state: ServeState, spec: StructuredOutput, param: str) -> None:
    """Compile `spec` on a worker thread (the engine later finds it in xgrammar's cache); a 400 naming `param`
    when it does not compile, a 501 when this server cannot compile grammars at all."""
    grammars = state.engine.engine.grammars
    try:
        await asyncio.get_running_loop().run_in_executor(None, grammars.compile, spec)
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param) from None
    except GrammarUnavailable as e:
        raise APIError(501, f"{param}: {e}", param, code="structured_outputs_unavailable") from None
