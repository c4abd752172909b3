"""The memory report's numbers on the tiny model, and the decode path's allocations on the CPU: decode
steps through the (emulated) graphs, counted outside the forward pass that the GPU replays from its graph."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanovllm import LLM, SamplingParams
from nanovllm.engine import cuda_graphs, decode_allocations
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.memory_report import MemoryReport
from nanovllm.quant.weights import QuantizedWeight


class NewStorages(TorchDispatchMode):
    """Counts op outputs on the CPU whose storage is none of the op's inputs' (new memory), outside paused
    sections."""

    def __init__(self):
        super().__init__()
        self.count, self.paused, self.ops = 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.count += 1
                    self.ops.append(str(func))
        return out

    def pause(self, fn):
        def run(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return run


@pytest.fixture(scope="module")
def emulated(tiny_model):
    with LLM(str(tiny_model), max_model_len=128, num_kvcache_blocks=80, max_num_seqs=8) as llm:
        runner = llm.engine.runner
        runner.graphs = DecodeGraphs(runner, runner.forward, capture_graphs=False)
        runner.graphs.capture()
        yield llm


def test_report_counts_weights_and_kv_cache(emulated):
    runner = emulated.engine.runner
    report = MemoryReport.of(runner)
    params = {p.data_ptr(): p.numel() * p.element_size() for p in runner.model.parameters()}
    quantized = sum(b.numel() * b.element_size() for m in runner.model.modules() if isinstance(m, QuantizedWeight)
                    for b in m.buffers(recurse=False))
    assert report.weights_bytes == sum(params.values()) + quantized > 0
    block_bytes = runner.block_size * runner.kv_bytes_per_token
    assert report.kv_cache_bytes == (runner.num_blocks + 1) * block_bytes  # + the padding slots' scratch block
    assert report.activation_bytes is None and report.other_bytes is None  # measured on CUDA only
    assert report.workspace_bytes == runner.workspaces.nbytes >= report.workspaces["sampling_noise"] > 0
    assert report.gauges() == {"weights": report.weights_bytes, "kv_cache": report.kv_cache_bytes,
                               "workspace": report.workspace_bytes}
    assert report.summary.startswith("Memory: weights ") and "KV cache" in report.summary
    assert report.as_dict()["kv_cache_bytes"] == report.kv_cache_bytes
    assert runner.memory.weights_bytes == report.weights_bytes


@pytest.mark.parametrize("batch, params", [(1, SamplingParams(temperature=0.0)),
                                           (8, SamplingParams(temperature=0.8))])
def test_decode_steps_allocate_nothing_outside_the_graph(emulated, monkeypatch, batch, params):
    runner = emulated.engine.runner
    counter = NewStorages()
    # What a graph replay does on the GPU (the forward pass and its sampling) and the pinned host copy of the
    # tokens (host memory) are not counted; everything else a decode step runs is.
    monkeypatch.setattr(runner.graphs, "_run", counter.pause(runner.graphs._run))
    monkeypatch.setattr(runner.graphs.buffers, "to_host", counter.pause(runner.graphs.buffers.to_host))
    runner.workspaces.freeze()  # strict: a decode step that outgrew a workspace would raise
    try:
        with counter:
            result = decode_allocations.measure(emulated.engine, batch, params, steps=8, warmup_steps=4,
                                                counters=lambda: {"new_storages": counter.count})
    finally:
        runner.workspaces.thaw()
    assert result.graph and result.sampling == ("greedy" if batch == 1 else "sampled")
    assert result.allocation_free, counter.ops[-10:]


def test_steps_after_a_row_finishes_allocate_nothing(emulated, monkeypatch):
    """Rows finishing at different steps: the steps launched ahead on the rows left gather their tokens on the
    device into the step buffers (KeptRows), with no index tensor."""
    engine = emulated.engine
    counter = NewStorages()
    monkeypatch.setattr(engine.runner.graphs, "_run", counter.pause(engine.runner.graphs._run))
    monkeypatch.setattr(engine.runner.graphs.buffers, "to_host", counter.pause(engine.runner.graphs.buffers.to_host))
    for i in range(8):
        engine.add_request([i + 5] * 6, SamplingParams(temperature=0.0, max_tokens=6 + 2 * i, ignore_eos=True))
    for _ in range(4):
        engine.step()
    gathered, upload_kept = [], engine.runner.graphs.buffers._upload_kept
    monkeypatch.setattr(engine.runner.graphs.buffers, "_upload_kept",
                        lambda t, b, w, tokens, n: gathered.append(n) or upload_kept(t, b, w, tokens, n))
    with counter:
        while engine.has_unfinished():
            engine.step()
    assert gathered and counter.count == 0, counter.ops[-10:]


def test_small_filtered_batches_sample_in_their_graph(emulated, monkeypatch):
    """top-k/top-p/min-p rows of a batch up to FILTERED_MAX_ROWS: sampled by the filtered graph (its buffers
    filled without allocating), giving the tokens sampling outside the graph gives from the same noise."""
    runner = emulated.engine.runner
    counter = NewStorages()
    monkeypatch.setattr(runner.graphs, "_run", counter.pause(runner.graphs._run))
    monkeypatch.setattr(runner.graphs.buffers, "to_host", counter.pause(runner.graphs.buffers.to_host))
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05)
    with counter:
        result = decode_allocations.measure(emulated.engine, 8, params, steps=2, warmup_steps=3,
                                            counters=lambda: {"new_storages": counter.count})
    assert result.graph and result.sampling == "filtered" and result.allocation_free, counter.ops[-10:]
    seeded = [SamplingParams(temperature=0.9, top_k=20 * (i % 2), top_p=0.8, seed=i, max_tokens=3, ignore_eos=True)
              for i in range(8)]
    prompts = [[i + 9] * (3 + i) for i in range(8)]
    in_graph = [r["token_ids"] for r in emulated.generate(prompts, seeded)]
    monkeypatch.setattr(cuda_graphs, "FILTERED_MAX_ROWS", 0)  # every filtered batch sampled outside the graph
    assert [r["token_ids"] for r in emulated.generate(prompts, seeded)] == in_graph
