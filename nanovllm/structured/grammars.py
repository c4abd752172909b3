"""StructuredOutput -> xgrammar compiled grammar -> one matcher per sequence.

The tokenizer's vocabulary is analysed once, on first use (about a second for Qwen3's 151k tokens); compiled
grammars are cached by xgrammar, so a schema sent again compiles in microseconds. `compile` is safe to call from
any thread: the server compiles (and so checks) a request's grammar before the request reaches the engine."""

from __future__ import annotations

import json
import threading

from nanovllm.structured.spec import StructuredOutput


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class GrammarUnavailable(RuntimeError):
    """The grammar library does not import here: constrained requests cannot be served."""


def xgrammar():
    """The xgrammar module, or GrammarUnavailable naming why it does not import (it is an optional dependency,
    and a wheel can miss a native dependency of its own)."""
    try:
        import xgrammar as xgr
    except ImportError as e:
        raise GrammarUnavailable("structured outputs need the xgrammar package, which does not import here "
                                 f"({type(e).__name__}: {e}); pip install xgrammar") from None
    return xgr


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()

    @property
    def compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def compile(self, spec: StructuredOutput):
        """The compiled grammar of `spec`; ValueError naming the problem when it does not compile,
        GrammarUnavailable when xgrammar does not import."""
        xgr = xgrammar()
        c = self.compiler
        try:
            if spec.kind == "json":
                # Compact JSON (no free whitespace): a model cannot spend its tokens on blank space.
                return c.compile_json_schema(spec.schema_text(), any_whitespace=False)
            if spec.kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return c.compile_regex(spec.regex)
            if spec.kind == "choice":
                return c.compile_grammar("root ::= " + " | ".join(_ebnf_literal(s) for s in spec.choice))
            if spec.kind == "grammar":
                return c.compile_grammar(spec.grammar)
            return c.compile_grammar(_tool_call_grammar(xgr, spec.tool_calls))
        except RuntimeError as e:  # xgrammar reports parse and conversion errors as RuntimeError
            detail = str(e).strip().splitlines()
            raise ValueError(f"the {spec.kind} grammar does not compile: {detail[0] if detail else e}") from None

    def matcher(self, spec: StructuredOutput):
        return xgrammar().GrammarMatcher(self.compile(spec))


def _tool_call_grammar(xgr, fmt):
    """One `<tool_call>` block (or several, newline-separated, when parallel) whose JSON is one of the call
    schemas."""
    schemas = [json.loads(s) for s in fmt.calls]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    call = xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'),
                              xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False),
                              xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'))
    if not fmt.parallel:
        return call
    text = str(call)
    # root ::= call ("\n" call)*: the call's rules renamed under `call`, so the repetition can name it.
    return xgr.Grammar.from_ebnf(text.replace("root ::=", "call ::=", 1) + '\nroot ::= call ("\\n" call)*\n')
