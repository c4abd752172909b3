"""nano-vllm's offline throughput workload: 256 requests of random token ids, input and output lengths
uniform in [100, 1024] (random.Random(0)), ignore_eos, temperature 0.6 as nano-vllm's bench.py uses.
Output tok/s = generated tokens / wall time of one generate() call."""

from __future__ import annotations

import random
import time

from nanovllm.sampling_params import SamplingParams

NUM_REQUESTS = 256
MIN_LEN, MAX_LEN = 100, 1024
TEMPERATURE = 0.6


def workload(num_requests: int = NUM_REQUESTS, min_len: int = MIN_LEN, max_len: int = MAX_LEN,
             temperature: float = TEMPERATURE, seed: int = 0, vocab: int = 10000, detokenize: bool = True):
    """(prompts, params): prompts first, then output lengths, all from one seeded generator."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_requests)]
    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=rng.randint(min_len, max_len),
                             detokenize=detokenize)
              for _ in range(num_requests)]
    return prompts, params


def measure(llm, num_requests: int = NUM_REQUESTS, min_len: int = MIN_LEN, max_len: int = MAX_LEN,
            temperature: float = TEMPERATURE, deadline_s: float | None = None, detokenize: bool = True) -> dict:
    """Past `deadline_s` of wall time the run stops early (complete=False): its tok/s then covers only
    the full-batch part of the workload and is not comparable with a complete run. detokenize=False: token
    ids only, as nano-vllm's bench.py measures (its engine decodes no text while generating)."""
    prompts, params = workload(num_requests, min_len, max_len, temperature, detokenize=detokenize)
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8))  # warm up outside the clock
    llm.capture_cuda_graphs()  # the workload's batch sizes too
    generated, complete = 0, True
    preempted = llm.engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    for out in llm.stream(prompts, params):  # the same engine loop as generate(), with a way out
        generated += len(out["token_ids"])
        if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
            complete = False
            break
    wall = time.perf_counter() - t0
    prompt_tokens = sum(map(len, prompts))
    return dict(output_tok_s=generated / wall, total_tok_s=(generated + prompt_tokens) / wall, wall_s=wall,
                generated_tokens=generated, prompt_tokens=prompt_tokens, complete=complete,
                expected_tokens=sum(p.max_tokens for p in params), num_requests=num_requests, min_len=min_len,
                max_len=max_len, temperature=temperature, detokenize=detokenize,
                # preemptions recompute prompts: a KV cache too small for the workload shows here
                preemptions=llm.engine.scheduler.num_preemptions - preempted,
                kv_cache_tokens=llm.engine.block_manager.num_blocks * llm.config.kvcache_block_size)
