"""On the GPU: verify steps replay their CUDA graphs (per batch size, k + 1 rows per sequence) and greedy output
stays token for token what plain decoding (through the decode graphs) gives, for n-gram and draft-model
speculation at batch 1 and at a batch of several."""

from __future__ import annotations

import random

import pytest

from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

ENGINE = dict(dtype="float32", max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.5)


def prompts(n: int = 32) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1000) for _ in range(rng.randrange(3, 9))] * 3 for _ in range(n)]


@pytest.fixture(scope="module")
def plain(tiny_model):
    with LLM(str(tiny_model), **ENGINE) as llm:
        p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        yield [r["token_ids"] for r in llm.generate(prompts(), p)], [llm.generate([q], p)[0]["token_ids"]
                                                                     for q in prompts(4)]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_identical_through_verify_graphs(tiny_model, plain, method):
    spec = {"method": method, "num_speculative_tokens": 4, "max_batch_size": 8, "prompt_lookup_min": 1}
    if method == "draft_model":
        spec["model"] = str(tiny_model)
    with LLM(str(tiny_model), speculative_config=spec, **ENGINE) as llm:
        p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        assert [llm.generate([q], p)[0]["token_ids"] for q in prompts(4)] == plain[1]  # batch 1
        assert [r["token_ids"] for r in llm.generate(prompts()[:8], p)] == plain[0][:8]  # a batch of 8
        assert [r["token_ids"] for r in llm.generate(prompts(), p)] == plain[0]  # 32: above max_batch_size
        s = llm.engine.speculator
        assert s.graphs is not None and s.graphs.ready and s.totals.num_accepted_tokens > 0
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
