"""Batch-1 speed through the public API: TTFT, prefill tok/s and decode tok/s.

Decode speed is the median time between streamed tokens, so one slow step (a compile, a page fault)
does not move it. Each measured prompt starts differently, so the prefix cache cannot serve it.
"""

from __future__ import annotations

import statistics
import time

from nanovllm.sampling_params import SamplingParams

FILLER = ("The history of computing is a story of machines that became smaller, faster and cheaper, "
          "while the problems people asked them to solve grew larger every year. ")
DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def prompt_ids(tokenizer, length: int, tag: int) -> list[int]:
    """`length` token ids of plain text; `tag` makes the first block unique (no prefix-cache hits)."""
    text = f"Document {tag}. "
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < length:
        text += FILLER
        ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:length]


def stream_times(llm, ids: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """(seconds to the first token, seconds per later token) for one greedy request."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for out in llm.stream([ids], params):
        if out["token_ids"]:
            stamps.append((time.perf_counter(), len(out["token_ids"])))
    if not stamps:
        raise RuntimeError("the engine streamed no tokens")
    per_token = [(t - prev) / n for (prev, _), (t, n) in zip(stamps, stamps[1:])]
    return stamps[0][0] - t0, per_token


def measure(llm, decode_tokens: int, prefill_len: int, warmup: int, repeats: int) -> dict:
    """The batch-1 benchmark: warmup runs, then a decode run and `repeats` prefill runs."""
    tok = llm.tokenizer
    cfg = llm.config
    # keep every request inside what the engine accepts
    prefill_len = max(1, min(prefill_len, cfg.max_model_len - 1, cfg.max_num_batched_tokens))
    decode_ids = tok.encode(DECODE_PROMPT, add_special_tokens=False)
    decode_tokens = max(2, min(decode_tokens, cfg.max_model_len - len(decode_ids) - 8))
    tag = 0

    def decode_prompt() -> list[int]:
        nonlocal tag
        tag += 1
        return tok.encode(f"{tag}. ", add_special_tokens=False) + decode_ids

    def long_prompt() -> list[int]:
        nonlocal tag
        tag += 1
        return prompt_ids(tok, prefill_len, tag)

    for _ in range(warmup):
        stream_times(llm, decode_prompt(), min(decode_tokens, 16))
        stream_times(llm, long_prompt(), 1)
    ids = decode_prompt()
    ttft, per_token = stream_times(llm, ids, decode_tokens)
    step = statistics.median(per_token)
    prefill = statistics.median(stream_times(llm, long_prompt(), 1)[0] for _ in range(max(1, repeats)))
    return dict(
        ttft_ms=ttft * 1e3, decode_tok_s=1.0 / step, decode_ms_per_token=step * 1e3,
        decode_tokens=decode_tokens, decode_prompt_len=len(ids),
        # mean context over the decode run: what the roofline's KV term is computed for
        decode_context=len(ids) + decode_tokens // 2,
        prefill_tok_s=prefill_len / prefill, prefill_ttft_ms=prefill * 1e3, prefill_len=prefill_len,
        warmup=warmup, repeats=max(1, repeats),
    )
