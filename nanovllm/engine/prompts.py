"""Prompt checks shared by the engine (`LLMEngine.tokenize`) and the server's tokenizer workers.

A prompt is text or a list of token ids. Every problem raises ValueError with a message that names it, so
callers can answer it as a client error: invalid Unicode (a lone UTF-16 surrogate cannot be encoded), an
empty prompt, ids outside the vocabulary, or more tokens than `max_model_len` leaves room for.
"""

from __future__ import annotations


def check_unicode(text: str, what: str = "prompt") -> None:
    """Raise ValueError if `text` holds a code point that UTF-8 cannot encode (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: lone surrogate {text[e.start]!r} at character "
                         f"{e.start}") from None


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token covers: 4x the longest vocabulary entry (a byte-level or
    SentencePiece token decodes to at most as many characters as it is spelled with; the factor leaves room
    for normalizers that fold several characters into one). A text of more than `max_len` times this many
    characters cannot fit `max_len` tokens, which is known without tokenizing it."""
    return 4 * max(len(token) for token in tokenizer.get_vocab())


def encode_prompt(tokenizer, prompt, *, max_model_len: int, vocab_size: int, chars_per_token: int | None = None,
                  add_special_tokens: bool = True, keep_last: int | None = None) -> list[int]:
    """Checks one prompt (text or token ids) and returns its ids; raises ValueError naming the problem.
    `keep_last`: only the last this many ids are kept (truncate_prompt_tokens), before the length check."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        check_unicode(prompt)
        if chars_per_token and not keep_last and len(prompt) > max_model_len * chars_per_token:
            raise ValueError(f"prompt has {len(prompt)} characters, more than max_model_len={max_model_len} tokens "
                             "can hold")
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty (no token ids)")
        ids = ids[-keep_last:] if keep_last else ids
        _check_length(len(ids), max_model_len)  # before the per-id checks, which cost time on long lists
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"token id {t!r} at position {i} is outside the vocabulary [0, {vocab_size})")
    else:
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    ids = ids[-keep_last:] if keep_last else ids
    if not ids:
        raise ValueError("prompt is empty after tokenization")
    _check_length(len(ids), max_model_len)
    return ids


def _check_length(num_tokens: int, max_model_len: int) -> None:
    if num_tokens >= max_model_len:
        raise ValueError(f"prompt has {num_tokens} tokens but max_model_len is {max_model_len} "
                         "(which must leave room for at least one new token)")
