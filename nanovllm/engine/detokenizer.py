"""Incremental detokenization with stop strings.

Text is decoded from a window of recent tokens, so each step costs O(window), and a multi-byte
character split across tokens is held back until it is complete. While a request runs, the last
few characters that could still begin a stop string are held back too, so a stream never shows
text that a stop string later removes.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], include_stop: bool = False):
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust tokenizer directly: half the cost of transformers' decode(), which matters
        # at 256 running requests (two decodes per token per request, on the engine's hot path).
        fast = getattr(tokenizer, "_tokenizer", None)
        plain = fast is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.decoder = fast if plain else tokenizer
        self.ids = list(prompt_ids[-6:])   # a little context so the first token decodes as it would in text
        self.prefix = 0                    # decode(ids[prefix:read]) is already part of the text
        self.read = len(self.ids)
        self.text = ""
        self.sent = 0                      # characters of text already handed out
        self.stop = stop
        self.include_stop = include_stop   # keep the matched stop string at the end of the text
        self.hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids) -> str:
        return self.decoder.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int, check_stop: bool = True) -> bool:
        """Append a token; returns True when the text now contains a stop string (text cut before it, or after
        it with include_stop). With check_stop False the new text is not searched for stop strings."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return False  # incomplete character (or nothing visible yet): wait for more tokens
        old = len(self.text)
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        cuts = [(c, c + len(s)) for s in self.stop if (c := self.text.find(s, max(old - len(s) + 1, 0))) != -1] \
            if check_stop else []
        if cuts:
            start, end = min(cuts)
            self.text = self.text[:end if self.include_stop else start]
            self.sent = min(self.sent, len(self.text))
            return True
        return False

    def delta(self, finished: bool) -> str:
        """New text since the last call; while unfinished, keep back what may start a stop string."""
        end = len(self.text) if finished else max(len(self.text) - self.hold, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out


class NoText:
    """For requests with detokenize=False: token ids only, no text and no stop strings."""

    def add(self, token_id: int, check_stop: bool = True) -> bool:
        return False

    def delta(self, finished: bool) -> str:
        return ""


NO_TEXT = NoText()
