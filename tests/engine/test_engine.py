"""Scheduler, paged KV cache, prefix cache and preemption: batched results equal solo results."""

from __future__ import annotations

import random

import pytest

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(151000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def solo(llm, ps, params=GREEDY):
    return [llm.generate([p], params)[0]["token_ids"] for p in ps]


def assert_all_blocks_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.requests and not llm.engine.has_unfinished()


def test_batch_of_32_equals_each_alone(tiny_llm):
    ps = prompts(32)
    batched = [r["token_ids"] for r in tiny_llm.generate(ps, GREEDY)]
    assert batched == solo(tiny_llm, ps)
    assert all(len(t) == GREEDY.max_tokens for t in batched)
    assert_all_blocks_free(tiny_llm)


def test_chunked_prefill_equals_unchunked(tiny_model, tiny_llm):
    ps = prompts(8, seed=1, lo=40, hi=120)
    chunked = LLM(str(tiny_model), dtype="float64", max_model_len=512, num_kvcache_blocks=256,
                  max_num_batched_tokens=24, enable_prefix_caching=False)
    assert [r["token_ids"] for r in chunked.generate(ps, GREEDY)] == solo(tiny_llm, ps)


@pytest.mark.parametrize("shared", [32, 40])  # a whole number of blocks, and a partial last block
def test_prefix_cache_hits_give_identical_outputs(tiny_llm, shared):
    bm = tiny_llm.engine.block_manager
    base = prompts(1, seed=2, lo=shared, hi=shared)[0]
    first = tiny_llm.generate([base + [7, 8, 9]], GREEDY)[0]["token_ids"]
    # Partial hit: same prefix, different tail.
    engine = tiny_llm.engine
    rid = engine.add_request(base + [1, 2, 3], GREEDY)
    seq = engine.requests[rid][0]
    engine.scheduler.schedule()
    assert seq.num_computed_tokens == (shared // bm.block_size) * bm.block_size > 0  # came from the cache
    engine.abort_request(rid)
    # Full hit: the whole prompt is cached (prompt of exactly two blocks, then again).
    full = base[:32]
    a = tiny_llm.generate([full], GREEDY)[0]["token_ids"]
    rid = engine.add_request(full, GREEDY)
    seq = engine.requests[rid][0]
    engine.scheduler.schedule()
    assert seq.num_computed_tokens == 31  # every block hit; the last token is recomputed for its logits
    engine.abort_request(rid)
    assert tiny_llm.generate([full], GREEDY)[0]["token_ids"] == a
    assert tiny_llm.generate([base + [7, 8, 9]], GREEDY)[0]["token_ids"] == first
    # And against an engine without prefix caching.
    assert_all_blocks_free(tiny_llm)


def test_prefix_cache_matches_no_cache(tiny_model, tiny_llm):
    base = prompts(1, seed=3, lo=50, hi=50)[0]
    ps = [base + t for t in ([1], [2, 3], [4, 5, 6], [])]
    cold = LLM(str(tiny_model), dtype="float64", max_model_len=512, num_kvcache_blocks=256,
               enable_prefix_caching=False)
    expected = [r["token_ids"] for r in cold.generate(ps, GREEDY)]
    tiny_llm.generate([base], GREEDY)  # warm the cache
    assert [r["token_ids"] for r in tiny_llm.generate(ps, GREEDY)] == expected


def test_preemption_under_tiny_kv_budget(tiny_model, tiny_llm):
    ps = prompts(12, seed=4, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    small = LLM(str(tiny_model), dtype="float64", max_model_len=128, num_kvcache_blocks=12, kvcache_block_size=16)
    out = [r["token_ids"] for r in small.generate(ps, params)]
    assert small.engine.scheduler.num_preemptions > 0
    # the float64 engine's batched tokens are each request's solo tokens (test_batch_of_32_equals_each_alone)
    assert out == [r["token_ids"] for r in tiny_llm.generate(ps, params)]
    assert_all_blocks_free(small)


def test_stream_deltas_add_up_to_generate(tiny_llm):
    ps = ["Hello, world!", "The quick brown fox"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = tiny_llm.generate(ps, params)
    text, ids = ["", ""], [[], []]
    for out in tiny_llm.stream(ps, params):
        text[out["index"]] += out["text"]
        ids[out["index"]] += out["token_ids"]
    assert ids == [r["token_ids"] for r in full]
    assert text == [r["text"] for r in full]


def test_stream_stopped_early_frees_blocks(tiny_llm):
    it = tiny_llm.stream(["Hello"] * 3, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert_all_blocks_free(tiny_llm)


def test_abort_mid_batch_leaves_others_unchanged(tiny_llm):
    ps = prompts(4, seed=5)
    expected = solo(tiny_llm, ps)
    engine = tiny_llm.engine
    ids = [engine.add_request(p, GREEDY) for p in ps]
    got = {i: [] for i in ids}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
        steps += 1
        if steps == 3:
            engine.abort_request(ids[1])
    assert [got[i] for i in (ids[0], ids[2], ids[3])] == [expected[0], expected[2], expected[3]]
    assert_all_blocks_free(tiny_llm)


def test_chat_template_prompt(tiny_llm):
    msgs = [{"role": "user", "content": "Hi!"}]
    on, off = tiny_llm.apply_chat_template(msgs, True), tiny_llm.apply_chat_template(msgs, False)
    assert on.endswith("<|im_start|>assistant\n") and off.endswith("<think>\n\n</think>\n\n")
    assert len(tiny_llm.chat(msgs, GREEDY)[0]["token_ids"]) == GREEDY.max_tokens
