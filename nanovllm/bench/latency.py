"""Batch-1 decode latency: a prompt of `context` tokens, then `new_tokens` greedy tokens (ignore_eos),
timed per token from the engine's stream. Median and p90 time per token; tok/s is 1 / median."""

from __future__ import annotations

import statistics

from nanovllm.speed import prompt_ids, stream_times

CONTEXTS = (128, 1024, 4096)
NEW_TOKENS = 256


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_context(llm, context: int, new_tokens: int, tag: int) -> dict:
    """One measured request. `tag` makes the prompt unique, so the prefix cache cannot shorten it."""
    ids = prompt_ids(llm.tokenizer, context, tag)
    ttft, per_token = stream_times(llm, ids, new_tokens)
    med = statistics.median(per_token)
    return dict(context=context, prompt_len=len(ids), new_tokens=new_tokens, decode_tok_s=1.0 / med,
                median_ms=med * 1e3, p90_ms=percentile(per_token, 90) * 1e3, ttft_ms=ttft * 1e3,
                # the mean context over the decode: the KV bytes the roofline charges per token
                mean_context=len(ids) + new_tokens // 2)


def measure(llm, contexts=CONTEXTS, new_tokens: int = NEW_TOKENS, warmup_tokens: int = 16) -> list[dict]:
    """Warm each context up first (graph capture, compile and allocator growth happen off the clock)."""
    tag = 1000  # distinct from the tags other benchmarks use in the same engine
    for ctx in contexts:
        tag += 1
        stream_times(llm, prompt_ids(llm.tokenizer, ctx, tag), min(warmup_tokens, new_tokens))
    out = []
    for ctx in contexts:
        tag += 1
        out.append(run_context(llm, ctx, new_tokens, tag))
    return out
