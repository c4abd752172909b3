"""Prompts to token ids for the server, off the engine thread and off the event loop.

The Rust tokenizer holds the GIL while it encodes (about two seconds per megabyte of text), and so does
the chat template's rendering: done in the server's process, a large prompt would stall the engine thread
and every stream with it. So a prompt of more than `INLINE_CHARS` characters is rendered and encoded in a
worker process (started on first use), and smaller ones on one helper thread, where they hold the GIL for a
few milliseconds at most. A text that cannot fit `max_model_len` tokens whatever it holds is refused at
once, without tokenizing it (`max_chars_per_token`). Every refusal is a ValueError naming the problem.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from nanovllm.engine.prompts import encode_prompt, max_chars_per_token

INLINE_CHARS = 16384


@dataclass(frozen=True)
class ChatPrompt:
    """Messages to render with the model's chat template; the rendered text holds its special tokens already."""
    messages: list = field(hash=False)
    template_kwargs: dict = field(default_factory=dict, hash=False)

    def __len__(self) -> int:
        return sum(len(m.get("content") or "") for m in self.messages)


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    chars_per_token: int


def prepare(tokenizer, prompt, limits: Limits, keep_last: int | None = None) -> list[int]:
    """Text, token ids or a ChatPrompt -> checked token ids (the last `keep_last` of them when given)."""
    kwargs = dict(max_model_len=limits.max_model_len, vocab_size=limits.vocab_size,
                  chars_per_token=limits.chars_per_token, keep_last=keep_last)
    if isinstance(prompt, ChatPrompt):
        if not keep_last and len(prompt) > limits.max_model_len * limits.chars_per_token:
            raise ValueError(f"the messages hold {len(prompt)} characters, more than max_model_len="
                             f"{limits.max_model_len} tokens can hold")
        try:
            text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True,
                                                 **prompt.template_kwargs)
        except Exception as e:  # the template's own checks (jinja raise_exception) and rendering errors
            raise ValueError(f"could not apply the chat template: {e}") from None
        if not text:
            raise ValueError("the chat template rendered an empty prompt")
        return encode_prompt(tokenizer, text, add_special_tokens=False, **kwargs)
    return encode_prompt(tokenizer, prompt, **kwargs)


_worker: tuple | None = None  # (tokenizer, limits) in a worker process


def _start_worker(model_path: str, limits: Limits) -> None:
    global _worker
    from transformers import AutoTokenizer

    _worker = (AutoTokenizer.from_pretrained(model_path, local_files_only=True), limits)


def _prepare_in_worker(prompt, keep_last: int | None) -> list[int]:
    return prepare(*_worker[:1], prompt, _worker[1], keep_last)


class PromptEncoder:
    def __init__(self, tokenizer, model_path: str, max_model_len: int, vocab_size: int):
        self.tokenizer, self.model_path = tokenizer, str(model_path)
        self.limits = Limits(max_model_len, vocab_size, max_chars_per_token(tokenizer))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="nanovllm-tokenize")
        self._process: ProcessPoolExecutor | None = None

    async def encode(self, prompts: list, keep_last: int | None = None) -> list[list[int]]:
        """Token ids of each prompt, in order, the last `keep_last` of each when given (truncate_prompt_tokens);
        ValueError for the first one refused."""
        loop = asyncio.get_running_loop()
        out = []
        for prompt in prompts:
            if isinstance(prompt, list) or len(prompt) <= INLINE_CHARS:  # ids: checked in O(n), length first
                out.append(await loop.run_in_executor(self._thread, prepare, self.tokenizer, prompt, self.limits,
                                                      keep_last))
            else:
                out.append(await self._encode_in_worker(loop, prompt, keep_last))
        return out

    async def _encode_in_worker(self, loop, prompt, keep_last: int | None) -> list[int]:
        chars = self.limits.max_model_len * self.limits.chars_per_token
        if isinstance(prompt, str) and not keep_last and len(prompt) > chars:  # refused without shipping it
            return prepare(None, prompt, self.limits)
        if self._process is None:
            self._process = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), _start_worker,
                                                (self.model_path, self.limits))
        try:
            return await loop.run_in_executor(self._process, _prepare_in_worker, prompt, keep_last)
        except BrokenProcessPool:  # the worker died (e.g. out of memory): this prompt fails, the next gets a new one
            self._process = None
            raise RuntimeError("the tokenizer worker process died while encoding this prompt") from None

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        if self._process is not None:
            self._process.shutdown(wait=False, cancel_futures=True)
            self._process = None
