"""On the GPU: weight offloading with real host-to-device copies on the copy stream, replayed from CUDA graphs,
gives the resident engine's greedy output token for token (batch 1, a batch of several, and prefill), keeps the
offloaded weights off the device, and gives its device and page-locked host memory back when closed."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.weight_offload import GIB

pytestmark = pytest.mark.gpu

ENGINE = dict(dtype="bfloat16", max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.5)
GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


def prompts(n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1000) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


def layer_bytes(llm) -> int:
    layer = llm.engine.runner.model.layers[0]
    return sum(p.nbytes for p in layer.parameters() if p.dim() >= 2)


def outputs(llm) -> tuple[list[list[int]], list[list[int]]]:
    single = [llm.generate([p], GREEDY)[0]["token_ids"] for p in prompts(3)]
    return single, [r["token_ids"] for r in llm.generate(prompts(12), GREEDY)]


@pytest.fixture(scope="module")
def model_dir(make_checkpoint):
    return make_checkpoint(num_hidden_layers=7, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=32)


@pytest.fixture(scope="module")
def resident(model_dir):
    with LLM(str(model_dir), **ENGINE) as llm:
        yield outputs(llm), layer_bytes(llm)


@pytest.mark.parametrize("layers", [1, 2.5, 6])
def test_offloaded_greedy_output_is_the_resident_one(model_dir, resident, layers):
    expected, per_layer = resident
    gib = layers * per_layer / GIB
    with LLM(str(model_dir), cpu_offload_gb=gib, **ENGINE) as llm:
        runner = llm.engine.runner
        off = runner.offloader
        assert runner.graphs is not None and runner.graphs.ready  # decode replays CUDA graphs
        assert off.host.device.type == "cpu" and all(s.is_cuda for s in off.slots)
        for params in off.params:  # the offloaded weights read the staging slots, on the device
            assert all(p.is_cuda for p, _, _ in params)
        assert off.offloaded_bytes >= gib * GIB
        assert outputs(llm) == expected
        before = torch.cuda.memory_allocated()
        assert outputs(llm) == expected  # again: the slots' contents are refreshed every forward pass
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before  # no device memory grows across steps


def test_closing_gives_device_and_host_memory_back(model_dir, resident):
    """Two engines in turn: the second leaves exactly what the first left (one-time kernel workspaces aside, no
    slot, cache or graph memory stays), and each one's page-locked host buffer is unregistered."""
    left = []
    for _ in range(2):
        llm = LLM(str(model_dir), cpu_offload_gb=3 * resident[1] / GIB, **ENGINE)
        host = weakref.ref(llm.engine.runner.offloader.host)
        assert host().is_pinned()
        llm.generate(prompts(4), GREEDY)
        llm.close()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        assert host() is None  # the page-locked host buffer was freed (and unregistered: utils/pinned.py)
        left.append(torch.cuda.memory_allocated())
    assert left[1] == left[0]
