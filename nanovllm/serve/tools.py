"""Tool calling in Qwen3's hermes style: the chat template lists the tools, and the model answers a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`tool_choice` "auto" (the default with tools) parses such blocks out of the answer; "required" and a named
function force them with a grammar (the JSON schema of a call of the allowed functions); "none" leaves the
answer as text. Parsed calls become OpenAI `tool_calls` (whole, or streamed as deltas: a call's id and name
first, then its arguments)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from nanovllm.serve.errors import APIError
from nanovllm.serve.protocol import ChatCompletionRequest, NamedToolChoice, ResponseFunctionCall, ResponseToolCall
from nanovllm.structured import StructuredOutput, ToolCallFormat

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class ToolSetup:
    template_tools: list[dict] | None   # what the chat template lists (None: no tools)
    grammar: StructuredOutput | None    # "required" or a named function: the calls the answer must make
    parse: bool                         # parse <tool_call> blocks out of the answer


def tool_setup(req: ChatCompletionRequest) -> ToolSetup:
    """The request's tools and tool_choice, checked (a 400 naming the field)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice 'required' or a named function needs `tools`", "tool_choice")
        return ToolSetup(None, None, False)
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise APIError(400, f"tools holds the same function name twice: {names}", "tools")
    listed = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools]
    if choice == "none":
        return ToolSetup(listed, None, False)
    if choice in (None, "auto"):
        return ToolSetup(listed, None, True)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in "
                           f"tools {names}", "tool_choice")
        tools, parallel = [t for t in req.tools if t.function.name == choice.function.name], False
    else:  # "required"
        tools, parallel = req.tools, req.parallel_tool_calls is not False
    calls = tuple(json.dumps(_call_schema(t.function.name, t.function.parameters)) for t in tools)
    return ToolSetup(listed, StructuredOutput(tool_calls=ToolCallFormat(calls, parallel)), True)


def _call_schema(name: str, parameters: dict | None) -> dict:
    arguments = parameters if parameters else {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _call(block: str) -> ResponseToolCall | None:
    """The call a <tool_call> block's JSON holds; None when it is not a call."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ResponseToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                            function=ResponseFunctionCall(name=obj["name"], arguments=arguments))


def parse_tool_calls(text: str) -> tuple[str | None, list[ResponseToolCall]]:
    """(the text outside the parsed blocks, or None when only calls remain; the calls, in order). A block
    whose JSON is not a call stays in the text."""
    calls, kept, end = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _call(m.group(1))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[end:m.start()])
        end = m.end()
    if not calls:
        return text, []
    content = ("".join(kept) + text[end:]).strip()
    return content or None, calls


def finish_reason(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


class ToolCallStream:
    """Splits a streamed answer into content and calls: text that may begin a <tool_call> is held back until
    it is known, and a call is given out once its block closes."""

    def __init__(self):
        self.pending = ""      # text not yet given out: a possible start of OPEN, or an open block
        self.num_calls = 0

    def feed(self, text: str, finished: bool) -> tuple[str, list[tuple[int, ResponseToolCall]]]:
        """(content to send now, [(index, call)] completed now). Once a call was made, text that is only
        whitespace (the newlines around blocks) is dropped."""
        self.pending += text
        content, calls = [], []
        while True:
            start = self.pending.find(OPEN)
            if start == -1:
                keep = 0 if finished else _partial_suffix(self.pending, OPEN)
                content.append(self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content.append(self.pending[:start])
            close = self.pending.find(CLOSE, start)
            if close == -1:  # an open block: wait for its end; unclosed at the finish, it is text
                content.append(self.pending[start:] if finished else "")
                self.pending = "" if finished else self.pending[start:]
                break
            call = _call(self.pending[start + len(OPEN):close].strip())
            if call is None:
                content.append(self.pending[start:close + len(CLOSE)])
            else:
                calls.append((self.num_calls, call))
                self.num_calls += 1
            self.pending = self.pending[close + len(CLOSE):]
        out = "".join(content)
        return ("" if self.num_calls and not out.strip() else out), calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def delta_chunks(index: int, call: ResponseToolCall) -> list[dict]:
    """The streamed deltas of one call, in OpenAI's shape: id, type and name first, then the arguments."""
    return [{"tool_calls": [{"index": index, "id": call.id, "type": "function",
                             "function": {"name": call.function.name, "arguments": ""}}]},
            {"tool_calls": [{"index": index, "function": {"arguments": call.function.arguments}}]}]
