"""The KV host tier (kv_offload_gb) and preemption by swapping: blocks keep their bits through the host, a prefix
evicted from the device comes back from the host with the output unchanged, swap preemption gives the outputs of
recompute preemption, and a long mixed run leaks no device block and no host slot."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.cli import to_hydra
from nanovllm.config import EngineConfig
from nanovllm.engine.kv_host_tier import TO_DEVICE, TO_HOST, HostBlockPool, HostKVCache, KVCopy, PreemptionCosts
from tests.config.test_hydra_configs import compose_run

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
TIER = dict(kv_offload_gb=0.001)  # 1 MiB: 64 blocks of the tiny float64 model's 16 KiB


def prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(151000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def tokens(outputs) -> list[list[int]]:
    return [r["token_ids"] for r in outputs]


def assert_no_leak(llm):
    engine = llm.engine
    bm = engine.block_manager
    assert not engine.has_unfinished() and not engine.requests
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    if engine.kv_tier is not None:
        pool = engine.kv_tier.pool
        pool.check()
        assert not pool.reserved and not pool.pinned


# -- the argument --------------------------------------------------------------------------------------------------
def test_arguments_validate_and_pass_through():
    assert EngineConfig(device="cpu").kv_offload_gb == 0 and EngineConfig(device="cpu").preemption_mode == "auto"
    with pytest.raises(ValueError, match="kv_offload_gb must be >= 0"):
        EngineConfig(device="cpu", kv_offload_gb=-1)
    with pytest.raises(ValueError, match="preemption_mode must be one of"):
        EngineConfig(device="cpu", preemption_mode="drop")
    with pytest.raises(ValueError, match="preemption_mode=swap needs a KV host tier"):
        EngineConfig(device="cpu", preemption_mode="swap")
    assert compose_run(["engine.kv_offload_gb=2.5"]).engine.kv_offload_gb == 2.5
    out = to_hydra("serve", ["tiny", "--kv-offload-gb", "4", "--preemption-mode", "swap"], ("tiny",), ())
    assert out.argv == ["model=tiny", "engine.kv_offload_gb=4", "engine.preemption_mode=swap"]


# -- bookkeeping -----------------------------------------------------------------------------------------------------
def test_pool_evicts_least_recently_used_and_never_pinned_or_reserved():
    pool = HostBlockPool(3)
    a, b, c = (pool.store(h, (h,)) for h in (1, 2, 3))
    assert sorted((a, b, c)) == [0, 1, 2] and pool.num_unused == 0
    assert pool.lookup(1, (1,)) == a and pool.lookup(2, (9,)) is None  # tokens verify the hit
    pool.pinned.add(b)
    assert pool.store(4, (4,)) == c  # 2 is the oldest but pinned; 3 goes
    assert pool.lookup(3, (3,)) is None
    assert pool.can_reserve(2) and not pool.can_reserve(3)
    slots = pool.reserve(2)  # evicts 1 and 4; the pinned 2 stays
    assert set(slots) == {a, c} and pool.lookup(2, (2,)) == b
    pool.pinned.clear()
    assert pool.store(5, (5,)) == b  # reserved slots are never evicted
    pool.check()
    pool.unreserve(slots)
    assert pool.num_unused == 2 and not pool.reserved
    pool.check()


def test_costs_choose_the_cheaper_way():
    costs = PreemptionCosts(bandwidth=1e9, bytes_per_block=1 << 20)
    assert not costs.swap_is_cheaper(10, 10_000)  # no prefill measured yet: recompute
    costs.observe_prefill(1000, 0.1)  # 10k tokens/s
    assert costs.swap_is_cheaper(10, 10_000)      # 21 ms of copies against 1 s of prefill
    assert not costs.swap_is_cheaper(10, 100)     # against 10 ms


# -- copies ----------------------------------------------------------------------------------------------------------
FP8 = getattr(torch, "float8_e4m3fn", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] + ([FP8] if FP8 is not None else []))
@pytest.mark.parametrize("staging_bytes", [1, 1 << 20])  # one block per run, and all at once
def test_blocks_round_trip_bit_for_bit(dtype, staging_bytes):
    layers, blocks, shape = 3, 9, (4, 2, 8)  # block_size 4, 2 KV heads, head_dim 8
    gen = torch.Generator().manual_seed(0)
    cache = [tuple((torch.randn(blocks, *shape, generator=gen) * 3).to(dtype) for _ in range(2))
             for _ in range(layers)]
    original = [(k.clone(), v.clone()) for k, v in cache]
    runner = SimpleNamespace(kv_cache=cache)
    host = HostKVCache(runner, num_blocks=6, staging_bytes=staging_bytes)
    # Out to host slots (stretches of consecutive slots), device blocks overwritten, then back into other blocks;
    # block 2 goes out again and is overwritten by block 7's copy in one list: the recorded order holds.
    host.run([KVCopy(TO_HOST, d, h) for d, h in [(3, 1), (1, 2), (4, 3), (7, 5), (2, 0)]])
    for k, v in cache:
        for b in (1, 3, 4):
            k[b].zero_(), v[b].zero_()
    host.run([KVCopy(TO_HOST, 2, 4), KVCopy(TO_DEVICE, 2, 5), KVCopy(TO_DEVICE, 8, 2), KVCopy(TO_DEVICE, 6, 3),
              KVCopy(TO_DEVICE, 1, 1)])
    host.synchronize()
    for (k, v), (k0, v0) in zip(cache, original):
        for got, want in ((k.view(torch.uint8), k0.view(torch.uint8)), (v.view(torch.uint8), v0.view(torch.uint8))):
            for dst, src in ((8, 1), (6, 4), (1, 3), (2, 7)):
                assert torch.equal(got[dst], want[src])
    assert torch.equal(host.blocks[4], host.blocks[0])  # block 2 went out twice with the same bits


# -- the engine ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_model):
    """No tier, a cache large enough for everything."""
    with LLM(str(tiny_model), dtype="float64", max_model_len=256, num_kvcache_blocks=128, kvcache_block_size=16,
             enable_prefix_caching=False) as llm:
        yield llm


def test_prefix_evicted_from_device_comes_back_from_host(tiny_model, reference):
    shared = prompts(3, seed=5, lo=96, hi=96)  # 6 full blocks each; the device holds 12 blocks
    ps = [p + [1, 2, 3] for p in shared] + [shared[0] + [4, 5], shared[1] + [6]]
    want = tokens(reference.generate(ps, GREEDY))
    with LLM(str(tiny_model), dtype="float64", max_model_len=128, num_kvcache_blocks=12, kvcache_block_size=16,
             **TIER) as llm:
        bm = llm.engine.block_manager
        got = [tokens(llm.generate([p], GREEDY))[0] for p in ps]
        assert got == want
        assert bm.num_prefix_host_hit_tokens == 2 * 96
        assert bm.num_prefix_device_hit_tokens == bm.num_prefix_hit_tokens - 2 * 96
        assert llm.engine.kv_tier.costs.prefill_tokens_per_s > 0  # measured on the prefill steps, for auto mode
        assert_no_leak(llm)


def test_swap_preemption_equals_recompute(tiny_model, reference):
    ps = prompts(8, seed=4, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = tokens(reference.generate(ps, params))
    with LLM(str(tiny_model), dtype="float64", max_model_len=128, num_kvcache_blocks=8, kvcache_block_size=16,
             preemption_mode="swap", **TIER) as llm:
        assert tokens(llm.generate(ps, params)) == want
        sched = llm.engine.scheduler
        assert sched.num_swapped_out > 0 and sched.num_preemptions >= sched.num_swapped_out
        assert_no_leak(llm)


def test_long_mixed_run_leaks_nothing(tiny_model, reference):
    """Shared prefixes, prompts longer than a step's budget, preemptions by swap and recompute (auto mode, its cost
    comparison answering each way in turn) and aborts at random steps: the requests that finish get the reference's
    tokens, and afterwards every block is free and the host slots add up."""
    rng = random.Random(7)
    stems = prompts(4, seed=8, lo=40, hi=70)
    ps = [rng.choice(stems) + p for p in prompts(28, seed=9, lo=1, hi=40)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in ps]
    want = tokens(reference.generate(ps, params))
    with LLM(str(tiny_model), dtype="float64", max_model_len=128, num_kvcache_blocks=16, kvcache_block_size=16,
             max_num_batched_tokens=64, kv_offload_gb=24 * 16 * 1024 / 2**30) as llm:
        engine, sched = llm.engine, llm.engine.scheduler
        turns = itertools.cycle([True, False])
        sched.swap_is_cheaper = lambda num_blocks, num_tokens: next(turns)
        ids = [engine.add_request(p, sp) for p, sp in zip(ps, params)]
        got = {rid: [] for rid in ids}
        aborted, steps = set(), 0
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id] += out.token_ids
            steps += 1
            if steps % 7 == 0:
                rid = rng.choice(ids)
                aborted |= {rid} if engine.abort_request(rid) else set()
            engine.kv_tier.pool.check()
        assert [got[rid] for rid in ids if rid not in aborted] == [w for rid, w in zip(ids, want) if rid not in aborted]
        assert 0 < sched.num_swapped_out < sched.num_preemptions and aborted
        assert engine.block_manager.num_prefix_host_hit_tokens > 0
        assert_no_leak(llm)


def test_copy_runs_keep_order_and_coalesce_slots():
    from nanovllm.engine.kv_host_tier import _runs, _spans

    copies = [KVCopy(TO_HOST, 1, 5), KVCopy(TO_HOST, 2, 4), KVCopy(TO_HOST, 3, 5), KVCopy(TO_DEVICE, 3, 5),
              KVCopy(TO_DEVICE, 4, 6), KVCopy(TO_DEVICE, 5, 7)]
    # a repeated target starts a new run (the later copy wins), a direction change too, and so does the limit
    assert [len(r) for r in _runs(copies, 2)] == [2, 1, 2, 1]
    assert _spans([4, 5, 6, 9, 10, 2]) == [(0, 4, 3), (3, 9, 2), (5, 2, 1)]
