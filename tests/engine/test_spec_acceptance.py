"""Acceptance and speed-up of n-gram speculation on the input-grounded workload (benchmarks/data), in CI size:
the tiny random model on the CPU, and SmolLM2-135M's real weights (its answers copy their prompts, so prompt
lookup drafts what it writes; slow: about two minutes on two cores, mostly the 32 prompts' prefills). Greedy
output identical to plain decoding throughout."""

from __future__ import annotations

import os
import time

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.bench.spec import load_prompts

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def timed_generate(llm, prompts, params):
    t0 = time.perf_counter()
    out = [r["token_ids"] for r in llm.generate(prompts, params)]
    return out, time.perf_counter() - t0


def test_ngram_accepts_on_grounded_text(tiny_model):
    spec = {**NGRAM, "max_batch_size": 1}
    with LLM(str(tiny_model), dtype="float64", max_model_len=512, num_kvcache_blocks=64,
             speculative_config=spec) as llm:
        prompts = load_prompts(limit=4)
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        spec_out = [llm.generate([p], params)[0]["token_ids"] for p in prompts]
        totals = llm.engine.speculator.totals
        llm.engine.speculator = None
        assert [llm.generate([p], params)[0]["token_ids"] for p in prompts] == spec_out
        assert totals.num_drafts > 0 and totals.mean_accepted_length > 1


@pytest.fixture(scope="module")
def smollm2():
    from nanovllm.checkpoints import MissingModelPackage, resolve_model

    try:
        resolve_model("smollm2-135m")
    except MissingModelPackage as e:
        pytest.skip(str(e))
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield "smollm2-135m"
    torch.set_num_threads(threads)


def chat_prompts(llm, n: int) -> list[str]:
    return [llm.apply_chat_template([{"role": "user", "content": p}], enable_thinking=False)
            for p in load_prompts(limit=n)]


ENGINE = dict(dtype="float32", max_model_len=1024, num_kvcache_blocks=2200, max_num_seqs=32)
SHORT = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def smollm2_plain(smollm2):
    """32 chat prompts (the 24 grounded ones and 8 again, batched) and their plain greedy outputs."""
    with LLM(smollm2, **ENGINE) as llm:
        texts = chat_prompts(llm, 24)
        prompts = texts + texts[:8]
        return prompts, timed_generate(llm, prompts, SHORT)[0]


@pytest.mark.slow
def test_smollm2_ngram_greedy_identical_and_faster(smollm2, smollm2_plain):
    """n-gram on the 32 prompts gives plain decoding's output; at batch 1, the regime speculation is for, it
    accepts more than one token per step."""
    prompts, plain_out = smollm2_plain
    with LLM(smollm2, speculative_config={**NGRAM, "max_batch_size": 32}, **ENGINE) as llm:
        assert timed_generate(llm, prompts, SHORT)[0] == plain_out
        ngram = llm.engine.speculator
        assert ngram.totals.mean_accepted_length > 1
        one = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        llm.engine.speculator = None
        plain_s = sum(timed_generate(llm, [p], one)[1] for p in prompts[:3])
        llm.engine.speculator = ngram
        before = ngram.totals.num_drafts, ngram.totals.num_accepted_tokens
        spec_s = sum(timed_generate(llm, [p], one)[1] for p in prompts[:3])
        drafts, kept = ngram.totals.num_drafts - before[0], ngram.totals.num_accepted_tokens - before[1]
        print(f"\nSmolLM2-135M batch 1, n-gram k=4: accepted length {1 + kept / max(drafts, 1):.2f}, "
              f"speed-up {plain_s / spec_s:.2f}x")
        assert 1 + kept / max(drafts, 1) > 1


@pytest.mark.slow
def test_smollm2_draft_model_greedy_identical(smollm2, smollm2_plain):
    """The model as its own draft on the 32 prompts: plain decoding's output, every draft kept."""
    prompts, plain_out = smollm2_plain
    draft = {"method": "draft_model", "model": smollm2, "num_speculative_tokens": 3, "max_batch_size": 32}
    with LLM(smollm2, speculative_config=draft, **ENGINE) as llm:
        assert timed_generate(llm, prompts, SHORT)[0] == plain_out
        totals = llm.engine.speculator.totals
        assert totals.num_accepted_tokens == totals.num_draft_tokens > 0
