"""Speculative decoding keeps greedy output exact: token for token what plain decoding gives, with n-gram and
draft-model proposers, and the KV blocks all come back."""

from __future__ import annotations

import random

import pytest

from nanovllm import LLM, SamplingParams

ENGINE = dict(dtype="float64", max_model_len=256, num_kvcache_blocks=160, kvcache_block_size=16, max_num_seqs=32)


def prompts(n: int = 32, seed: int = 0) -> list[list[int]]:
    """Token-id prompts with repeated spans (so prompt lookup finds n-grams) and plain random ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        span = [rng.randrange(1000) for _ in range(rng.randrange(3, 9))]
        out.append(span * rng.randrange(2, 5) + [rng.randrange(1000) for _ in range(i % 5)])
    return out


def generate(llm: LLM, ps, **params) -> list[list[int]]:
    sp = SamplingParams(**{"temperature": 0.0, "max_tokens": 24, "ignore_eos": True, **params})
    return [r["token_ids"] for r in llm.generate(ps, sp)]


@pytest.fixture(scope="module")
def plain(tiny_model):
    with LLM(str(tiny_model), **ENGINE) as llm:
        yield generate(llm, prompts()), generate(llm, prompts()[:4], max_tokens=60)


def assert_no_leak(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_ngram_greedy_identical(tiny_model, plain):
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
            "max_batch_size": 32}
    with LLM(str(tiny_model), speculative_config=spec, **ENGINE) as llm:
        assert generate(llm, prompts()) == plain[0]
        assert generate(llm, prompts()[:4], max_tokens=60) == plain[1]
        totals = llm.engine.speculator.totals
        assert totals.num_drafts > 0 and totals.num_accepted_tokens > 0
        assert_no_leak(llm)


def test_ngram_at_batch_one_only(tiny_model, plain):
    """max_batch_size 1: the 32-prompt batch decodes plainly (no draft), lone prompts speculate."""
    spec = {"method": "ngram", "num_speculative_tokens": 4, "max_batch_size": 1}
    with LLM(str(tiny_model), speculative_config=spec, **ENGINE) as llm:
        assert generate(llm, prompts()) == plain[0]
        assert llm.engine.speculator.totals.num_drafts == 0
        assert [generate(llm, [p])[0] for p in prompts()[:6]] == plain[0][:6]
        totals = llm.engine.speculator.totals
        assert totals.num_drafts > 0 and totals.num_accepted_tokens > 0
        assert_no_leak(llm)


def test_draft_model_target_as_its_own_draft(tiny_model, plain):
    spec = {"method": "draft_model", "model": str(tiny_model), "num_speculative_tokens": 3, "max_batch_size": 32}
    with LLM(str(tiny_model), speculative_config=spec, **ENGINE) as llm:
        assert generate(llm, prompts()) == plain[0]
        totals = llm.engine.speculator.totals
        # the target drafting for itself: every draft is kept
        assert totals.num_accepted_tokens == totals.num_draft_tokens > 0
        assert_no_leak(llm)
        draft = llm.engine.speculator.proposer
        assert not draft.twins and draft.block_manager.num_free_blocks == draft.block_manager.num_blocks


def test_draft_model_of_another_model(tiny_model, make_checkpoint, plain):
    other = make_checkpoint(seed=1)
    spec = {"method": "draft_model", "model": str(other), "num_speculative_tokens": 4, "max_batch_size": 8}
    with LLM(str(tiny_model), speculative_config=spec, **ENGINE) as llm:
        assert generate(llm, prompts()) == plain[0]
        assert_no_leak(llm)
