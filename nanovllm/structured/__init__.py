"""Grammar-constrained decoding (structured outputs): a request's output is kept inside a JSON schema, a
regular expression, a list of choices or an EBNF grammar by masking, at each step, the tokens the grammar
does not allow. The grammars are compiled and matched by xgrammar."""

from nanovllm.structured.spec import StructuredOutput, ToolCallFormat

__all__ = ["StructuredOutput", "ToolCallFormat"]
