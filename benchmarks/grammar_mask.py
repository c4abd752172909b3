"""Per-token cost of grammar-constrained decoding on the host: xgrammar against llguidance, on Qwen3's
tokenizer (151k tokens) and a JSON schema. For each library: the tokenizer's one-time analysis, the schema's
compile, and the time to fill one row's token bitmask at each position of a valid answer (then accept its
token), repeated to take the median. The mask's application to the logits runs on the device and is left out.

    python benchmarks/grammar_mask.py [--repeat 20]

Needs `pip install xgrammar llguidance`."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

VOCAB = 151936
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}}, "active": {"type": "boolean"},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "email", "tags", "active", "address"], "additionalProperties": False}
ANSWER = {"name": "Alice Smith", "age": 42, "email": "alice@example.com", "tags": ["admin", "hello world"],
          "active": True, "address": {"city": "Paris", "zip": "75001"}}


def xgrammar_run(tokenizer, ids, repeat):
    import xgrammar as xgr

    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB))
    t1 = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    t2 = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    times = []
    for _ in range(repeat):
        matcher = xgr.GrammarMatcher(grammar)
        for token in ids:
            s = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - s)
            assert matcher.accept_token(token)
    return t1 - t0, t2 - t1, times


def llguidance_run(tokenizer, ids, repeat):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={
        "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    llguidance.LLMatcher(tok, grammar)
    t2 = time.perf_counter()
    bitmask = llguidance.torch.allocate_token_bitmask(1, VOCAB)
    times = []
    for _ in range(repeat):
        matcher = llguidance.LLMatcher(tok, grammar)
        for token in ids:
            s = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            times.append(time.perf_counter() - s)
            assert matcher.consume_token(token), matcher.get_error()
    return t1 - t0, t2 - t1, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from nanovllm.assets.qwen_tokenizer import write_qwen3_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_qwen3_tokenizer(Path(d))
        tokenizer = AutoTokenizer.from_pretrained(d)
    ids = tokenizer.encode(json.dumps(ANSWER, separators=(", ", ": ")), add_special_tokens=False)
    print(f"answer: {len(ids)} tokens, {args.repeat} repeats")
    for name, run in (("xgrammar", xgrammar_run), ("llguidance", llguidance_run)):
        setup, compile_s, times = run(tokenizer, ids, args.repeat)
        us = sorted(t * 1e6 for t in times)
        print(f"{name:11s} tokenizer {setup:5.2f} s  compile {compile_s * 1e3:6.1f} ms  mask per token: "
              f"median {statistics.median(us):6.1f} us  mean {statistics.fmean(us):6.1f} us  "
              f"p99 {us[int(len(us) * 0.99)]:7.1f} us")


if __name__ == "__main__":
    main()
