"""The decode-graph path's padding and buffers, run on the CPU by replaying eagerly on the same buffers;
and the GPU warmup that sizes the KV cache, with the CUDA memory calls stubbed."""

from __future__ import annotations

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from nanovllm.engine.teacher_forcing import teacher_forced_logits


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def emulated(path, **kwargs) -> LLM:
    llm = LLM(str(path), dtype="float64", max_model_len=256, num_kvcache_blocks=96, **kwargs)
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner, runner.forward, capture_graphs=False)
    return llm


def test_padded_decode_batches_match_eager(tiny_model, tiny_llm):
    llm = emulated(tiny_model, max_num_seqs=6)  # sizes 1, 2, 4, 6: batches of 3 and 5 are padded
    prompts = [[i + 1] * (5 + 7 * i) for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = [r["token_ids"] for r in tiny_llm.generate(prompts, params)]
    calls = []
    run = llm.engine.runner.graphs.run
    llm.engine.runner.graphs.run = lambda batch: calls.append(len(batch)) or run(batch)
    assert [r["token_ids"] for r in llm.generate(prompts, params)] == expected
    assert calls and max(calls) == 5  # decode steps went through the padded path
    # Sampled and logprob rows are redone from the graph's hidden states.
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, logprobs=1)
    assert llm.generate(prompts[:3], seeded)[1]["token_ids"] == tiny_llm.generate(prompts[:3], seeded)[1]["token_ids"]


def test_padded_decode_logits_match(tiny_model, tiny_llm):
    llm = emulated(tiny_model, max_num_seqs=4)
    prompt, forced = list(range(300, 340)), [9, 8, 7, 6, 5]
    torch.testing.assert_close(teacher_forced_logits(llm.engine, prompt, forced),
                               teacher_forced_logits(tiny_llm.engine, prompt, forced))


def test_warmup_peak_runs_the_largest_step(tiny_model, monkeypatch):
    llm = LLM(str(tiny_model), max_model_len=64, num_kvcache_blocks=8, max_num_seqs=3, max_num_batched_tokens=150)
    runner = llm.engine.runner
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 350)
    seen = []
    forward = runner.forward
    runner.forward = lambda ids, pos, meta: seen.append(meta.host["seq_lens"].tolist()) or forward(ids, pos, meta)
    assert runner._warmup_peak() == 250
    # two prompts of max_model_len - 1 fill the 150-token budget; then a decode step of the largest graph
    # batch (max_num_seqs) over full-length block tables, the shape graphs are captured at
    # (after decode steps of 1 and 3 rows that let per-row-count kernels tune before the KV cache exists)
    assert seen == [[16], [16, 16, 16], [63, 63], [64, 64, 64]]
    assert runner.kv_cache is None
