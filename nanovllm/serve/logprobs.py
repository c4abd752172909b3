"""Logprobs in OpenAI's two formats, from the engine's per-token {"token_logprob", "top": {id: lp}}."""

from __future__ import annotations

from functools import lru_cache

from nanovllm.serve.protocol import CompletionLogprobs, PromptLogprob, TokenLogprob, TopLogprob


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the exact bytes behind a token's string."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Each token id's text and bytes, cached (the vocabulary does not change)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes_of = _byte_decoder()
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in self._bytes_of for c in piece):
            return [self._bytes_of[c] for c in piece]
        return list(self._text(token_id).encode())


def completion_logprobs(tt: TokenText, token_ids: list[int], entries: list[dict], offset: int) -> CompletionLogprobs:
    """`offset`: characters of the choice's text before these tokens (for text_offset)."""
    out = CompletionLogprobs()
    for tid, e in zip(token_ids, entries):
        text = tt.text(tid)
        out.tokens.append(text)
        out.token_logprobs.append(e["token_logprob"])
        out.top_logprobs.append({tt.text(i): lp for i, lp in e["top"].items()})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(tt: TokenText, token_ids: list[int], entries: list[dict], top: int) -> list[TokenLogprob]:
    return [TokenLogprob(token=tt.text(tid), logprob=e["token_logprob"], bytes=tt.bytes(tid),
                         top_logprobs=[TopLogprob(token=tt.text(i), logprob=lp, bytes=tt.bytes(i))
                                       for i, lp in list(e["top"].items())[:top]])
            for tid, e in zip(token_ids, entries)]


def prompt_logprobs(tt: TokenText, prompt_ids: list[int], entries: list[dict | None]) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: {logprob, rank, decoded_token}} holding
    the prompt token itself and its top alternatives (ranked 1, 2, ...)."""
    out: list[dict | None] = []
    for tid, e in zip(prompt_ids, entries):
        if e is None:
            out.append(None)
            continue
        entry = {str(tid): PromptLogprob(logprob=e["token_logprob"], rank=e["rank"], decoded_token=tt.text(tid))}
        for rank, (alt, lp) in enumerate(e["top"].items(), 1):
            entry.setdefault(str(alt), PromptLogprob(logprob=lp, rank=rank, decoded_token=tt.text(alt)))
        out.append(entry)
    return out


def echo_logprobs(tt: TokenText, prompt_ids: list[int], entries: list[dict | None], top: int) -> CompletionLogprobs:
    """The prompt's part of an echoed completion's logprobs: the first token has none, as in OpenAI's API."""
    out = CompletionLogprobs()
    offset = 0
    for tid, e in zip(prompt_ids, entries):
        text = tt.text(tid)
        out.tokens.append(text)
        out.token_logprobs.append(None if e is None else e["token_logprob"])
        out.top_logprobs.append(None if e is None else {tt.text(i): lp for i, lp in list(e["top"].items())[:top]})
        out.text_offset.append(offset)
        offset += len(text)
    return out
