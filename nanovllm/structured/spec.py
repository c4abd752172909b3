"""What a request's output must match: the user-facing description of a grammar, checked on construction.
It is compiled into token masks by nanovllm/structured/grammars.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

KINDS = ("json", "json_object", "regex", "choice", "grammar", "tool_calls")


@dataclass(frozen=True)
class ToolCallFormat:
    """Hermes-style tool calls (Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

    calls:    one JSON schema per function the output may call (the schema of the whole call object);
    parallel: more than one call, separated by a newline, may follow each other."""

    calls: tuple[str, ...]
    parallel: bool = True


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of:

    json:        a JSON schema (a dict or its JSON text): the output is one JSON value that validates;
    json_object: True: the output is any JSON object;
    regex:       the output matches this regular expression;
    choice:      the output is exactly one of these strings;
    grammar:     an EBNF grammar (xgrammar's / GBNF syntax, rule `root` first);
    tool_calls:  a ToolCallFormat.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    tool_calls: ToolCallFormat | None = None
    kind: str = field(init=False)

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutput takes exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        kind = given[0]
        object.__setattr__(self, "kind", kind)
        if kind == "json":
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"StructuredOutput.json is not valid JSON: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"StructuredOutput.json must be a JSON schema object, not {type(schema).__name__}")
        elif kind == "choice":
            choices = self.choice
            if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise ValueError("StructuredOutput.choice must be a list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        elif kind in ("regex", "grammar") and not (isinstance(getattr(self, kind), str) and getattr(self, kind)):
            raise ValueError(f"StructuredOutput.{kind} must be a non-empty string")
        elif kind == "tool_calls" and not (isinstance(self.tool_calls, ToolCallFormat) and self.tool_calls.calls):
            raise ValueError("StructuredOutput.tool_calls must be a ToolCallFormat with at least one call schema")
        elif kind == "json_object" and self.json_object is not True:
            raise ValueError("StructuredOutput.json_object must be True or left unset")

    def schema_text(self) -> str:
        """The JSON schema as text (kind "json")."""
        return self.json if isinstance(self.json, str) else json.dumps(self.json)
