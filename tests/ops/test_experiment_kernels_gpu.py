"""The experimental kernel variants (experiments/kernels/, loaded through kernels.plugin_dirs) on the GPU at
Qwen3-0.6B's shapes (bf16), with test_triton_gpu.py's cases and helpers. Run: pytest -m gpu
tests/ops/test_experiment_kernels_gpu.py
"""

from __future__ import annotations

import sys

import pytest
import torch

from nanovllm.ops import get_op, load_plugins
from tests.helpers import ROOT

pytest.importorskip("triton")
pytestmark = pytest.mark.gpu

from tests.ops.test_triton_gpu import (  # noqa: E402
    VOCAB,
    H,
    check_greedy_tokens,
    check_teacher_forced_logits,
    core,  # noqa: F401  (a fixture)
    engine_over_all_fused,
    engines,  # noqa: F401  (a fixture)
    layer_against_native,
    param,
    untuned,  # noqa: F401  (a fixture)
)
from tests.ops.test_triton_gpu import test_attention_decode as check_attention_decode  # noqa: E402  (not collected here)
from tests.ops.test_triton_gpu import test_attn_out as check_attn_out  # noqa: E402
from tests.ops.test_triton_gpu import test_rope_decode_attention as check_rope_decode_attention  # noqa: E402

EXPERIMENTS = ROOT / "experiments" / "kernels"


@pytest.fixture(scope="module")
def arrival(core):  # noqa: F811
    load_plugins([EXPERIMENTS])
    return sys.modules["nanovllm_plugins.kernels._arrival"]


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("scaled", [False, True])
def test_embedding(arrival, rows, scaled):
    """The vocabulary's last row included; a bf16 scale product rounds as the native's (exact)."""
    torch.manual_seed(rows)
    table, scale = param(VOCAB, H, scale=1.0), torch.tensor(H ** 0.5, device="cuda") if scaled else None
    ids = torch.randint(0, VOCAB, (rows,), device="cuda")
    ids[0] = VOCAB - 1
    want = get_op("embedding").native(ids, table, scale)
    torch.testing.assert_close(get_op("embedding").impls["triton"].fn(ids, table, scale), want, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 5])
def test_attn_out_onepass(arrival, core, rows, untuned):  # noqa: F811
    """The last GEMV program to arrive adds and normalizes (concurrent programs on the GPU)."""
    check_attn_out(core, rows, untuned, backend="triton_onepass")


@pytest.mark.parametrize("kv_lens", [[1], [128], [4100], [1, 300, 17, 4100]])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (256, 0.0), (0, 30.0)])
def test_attention_decode_onepass(arrival, core, kv_lens, window, softcap):  # noqa: F811
    check_attention_decode(core, kv_lens, window, softcap, backend="triton_onepass")


@pytest.mark.parametrize("kv_lens", [[1], [128], [4100], [1, 300, 17, 4100], [513] * 256])
def test_rope_decode_attention_onepass(arrival, core, kv_lens):  # noqa: F811
    check_rope_decode_attention(core, kv_lens, backend="triton_onepass")


@pytest.mark.parametrize("kv_len", [1, 129, 4100])
def test_persistent_decode_layer(arrival, kv_len):
    """The persistent layer kernel against the native layer; with its grid barriers it must equal, bit for
    bit, its phases launched one by one (no barrier: the launches order them), with either way of polling,
    eagerly and replayed in a graph."""
    s, (x, weights, settings, positions, table, kc, vc), _ = layer_against_native("triton_persistent", kv_len)
    args = (x, *weights, settings.eps, positions, table, kc, vc, s["meta"].slot_mapping, s["meta"].block_tables,
            arrival.counters(x.device, 64), settings.scale, settings.window, settings.softcap)
    op = torch.ops.nanovllm_experiments.persistent_decode_layer
    phased = op(*args, barrier=False)
    for poll_atomic in (False, True):
        for _ in range(20):
            assert torch.equal(op(*args, poll_atomic=poll_atomic), phased)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = op(*args)
    for _ in range(20):
        graph.replay()
        assert torch.equal(replayed, phased)
    assert not arrival.counters(x.device, 64).any(), "a counter is left armed"


@pytest.fixture(scope="module")
def persistent(engines):  # noqa: F811
    """all_fused with each layer's batch-1 decode step in the persistent layer kernel."""
    llm = engine_over_all_fused({"decode_layer": "triton_persistent"}, plugin_dirs=[EXPERIMENTS])
    yield llm
    llm.close()


def test_persistent_layer_model(engines, persistent):  # noqa: F811
    """The persistent layer kernel in the engine: eager decode steps (teacher forcing) and the CUDA graphs
    (greedy generation)."""
    assert persistent.engine.runner.resolver.table["0"]["decode_layer"] == "triton_persistent"
    check_teacher_forced_logits(engines[0], persistent, "all_fused+persistent_layer")
    check_greedy_tokens(engines[0], persistent, "all_fused+persistent_layer")
