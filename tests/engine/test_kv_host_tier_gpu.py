"""On the GPU: the KV host tier's real copies (pinned host memory, side stream, staging buffer) keep a block's bits,
and an engine with the tier (prefix blocks evicted and loaded back, preemption by swapping, CUDA graphs and async
scheduling on) gives token for token the greedy output of an engine without it."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.kv_host_tier import TO_DEVICE, TO_HOST, HostKVCache, KVCopy

pytestmark = pytest.mark.gpu

ENGINE = dict(dtype="float32", max_model_len=256, kvcache_block_size=16, max_num_seqs=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_round_trip_bit_for_bit_with_real_copies(dtype):
    layers, blocks, shape = 4, 300, (16, 8, 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = [tuple((torch.randn(blocks, *shape, device="cuda", generator=gen) * 3).to(dtype) for _ in range(2))
             for _ in range(layers)]
    original = [(k.clone(), v.clone()) for k, v in cache]
    host = HostKVCache(SimpleNamespace(kv_cache=cache), num_blocks=256, staging_bytes=8 << 20)  # several runs
    assert host.blocks.is_pinned()
    src = random.Random(0).sample(range(blocks), 200)
    host.run([KVCopy(TO_HOST, d, h) for h, d in enumerate(src)])
    for k, v in cache:  # the forward after the copies overwrites the blocks; the copies read them first
        k.zero_(), v.zero_()
    dst = random.Random(1).sample(range(blocks), 200)
    host.run([KVCopy(TO_DEVICE, d, h) for h, d in enumerate(dst)])
    torch.cuda.synchronize()
    s, d = torch.tensor(src, device="cuda"), torch.tensor(dst, device="cuda")
    for (k, v), (k0, v0) in zip(cache, original):
        assert torch.equal(k.view(torch.uint8)[d], k0.view(torch.uint8)[s])
        assert torch.equal(v.view(torch.uint8)[d], v0.view(torch.uint8)[s])


def prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(151000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """No host tier and a cache large enough for everything: a revisited prefix is a device hit."""
    with LLM(str(tiny_model), num_kvcache_blocks=256, **ENGINE) as llm:
        yield llm


PARAMS = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def test_host_hit_output_identical_to_device_hit(tiny_model, reference):
    """The same requests one at a time: the reference finds each revisited prefix on the device, the engine with
    two prefixes' worth of device blocks in its host tier; the steps compute the same, so the tokens are equal."""
    shared = prompts(4, seed=5, lo=96, hi=96)
    revisits = [p + [1, 2, 3] for p in shared] * 2
    want = [reference.generate([p], PARAMS)[0]["token_ids"] for p in revisits]
    with LLM(str(tiny_model), num_kvcache_blocks=16, kv_offload_gb=0.05, **ENGINE) as llm:
        assert [llm.generate([p], PARAMS)[0]["token_ids"] for p in revisits] == want
        assert llm.engine.block_manager.num_prefix_host_hit_tokens == 4 * 96


def test_swapped_sequence_continues_identically(tiny_model, reference):
    """A request preempted mid-decode by swapping resumes where it stopped: its tokens are those of a run without
    preemption (batch 1 throughout, so every step computes the same)."""
    prompt = prompts(1, seed=6, lo=70, hi=70)[0]
    want = reference.generate([prompt], PARAMS)[0]["token_ids"]
    with LLM(str(tiny_model), num_kvcache_blocks=64, kv_offload_gb=0.05, preemption_mode="swap",
             async_scheduling=False, **ENGINE) as llm:
        engine = llm.engine
        rid = engine.add_request(prompt, PARAMS)
        got, steps = [], 0
        while engine.has_unfinished():
            got += [t for out in engine.step() for t in out.token_ids]
            steps += 1
            if steps in (5, 20):  # preempt it as the scheduler does when blocks run out
                seq = engine.requests[rid][0]
                engine.scheduler.running.remove(seq)
                engine.scheduler._preempt(seq)
        assert got == want
        assert engine.scheduler.num_swapped_out == 2


def test_mixed_run_with_swaps_leaks_nothing(tiny_model):
    with LLM(str(tiny_model), num_kvcache_blocks=16, kv_offload_gb=0.05, preemption_mode="swap", **ENGINE) as llm:
        outs = llm.generate(prompts(16, seed=4, lo=20, hi=80), PARAMS)
        assert all(len(r["token_ids"]) == PARAMS.max_tokens for r in outs)
        assert llm.engine.scheduler.num_swapped_out > 0
        bm, pool = llm.engine.block_manager, llm.engine.kv_tier.pool
        assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
        pool.check()
        assert not pool.reserved
