"""On the GPU: decode steps through the CUDA graphs allocate no device memory (the CUDA caching allocator's
allocation and segment counters are unchanged across 1,000 steps), greedy at batch 1, temperature-sampled
and top-k/top-p-sampled at batch 8, with the default kernels and with every Triton kernel (their scratch
comes from the workspace pool); and the memory report measures the activations and workspaces."""

from __future__ import annotations

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine import decode_allocations

pytestmark = pytest.mark.gpu

ENGINE = dict(max_model_len=1100, max_num_seqs=8, gpu_memory_utilization=0.5)
ALL_TRITON = {"ops": {op: "triton" for op in ("linear", "norm_qkv", "qk_norm_rope", "attn_out", "mlp",
                                               "lm_head_sample", "attention_decode", "sample")}}


@pytest.fixture(scope="module", params=["auto", "triton"])
def llm(request, tiny_model):
    kernels = ALL_TRITON if request.param == "triton" else {}
    with LLM(str(tiny_model), dtype="bfloat16", kernels=kernels, **ENGINE) as llm:
        yield llm


def test_report_measures_every_kind(llm):
    report = llm.engine.runner.memory
    assert report.activation_bytes > 0 and report.other_bytes >= 0
    assert report.workspaces["sampling_noise"] > 0 and llm.engine.runner.workspaces.frozen


@pytest.mark.parametrize("batch, params, sampling", [
    (1, SamplingParams(temperature=0.0), "greedy"),
    (8, SamplingParams(temperature=0.8), "sampled"),
    (8, SamplingParams(temperature=0.8, top_k=50, top_p=0.9), "filtered")])
def test_decode_steps_allocate_nothing(llm, batch, params, sampling):
    result = decode_allocations.measure(llm.engine, batch, params, steps=1000)
    assert result.graph and result.sampling == sampling
    assert result.allocation_free, result.delta
