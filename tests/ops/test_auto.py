"""The `auto` kernel table: per op, the first ranked backend that serves the target and is not cold."""

from __future__ import annotations

import logging

import pytest
import torch

from nanovllm.ops import OpResolver, Target, get_op, load_plugins, register_impl
from nanovllm.ops import auto as auto_mod

SHAPES = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=1000)
CPU = Target("cpu", torch.float32, SHAPES)
CUDA = Target("cuda", torch.bfloat16, SHAPES)


@pytest.fixture
def fake_backends(monkeypatch):
    """silu_and_mul gets three test backends: one for the GPU only, one cold, one that always serves."""
    calls = []

    def cold(target):
        calls.append(target)
        return "2 JIT modules not built yet"

    op = get_op("silu_and_mul")
    register_impl("silu_and_mul", "t_gpu", devices=("cuda",))(op.native)
    register_impl("silu_and_mul", "t_cold", cold=cold)(op.native)
    register_impl("silu_and_mul", "t_any")(op.native)
    monkeypatch.setitem(auto_mod.RANKING, "cpu", {"silu_and_mul": ("t_missing", "t_gpu", "t_cold", "t_any")})
    yield calls
    for name in ("t_gpu", "t_cold", "t_any"):
        del op.impls[name]


def test_cpu_runs_every_op_natively():
    load_plugins()
    r = OpResolver({"default": "auto"}, CPU, 2)
    for scope in (0, 1, "model"):
        r.scope(scope)
    assert {b for used in r.table.values() for b in used.values()} == {"eager"}
    assert r.reasons == {} and r.summary().startswith("kernels (cpu, float32, default auto): eager for")


def test_cuda_gets_the_fused_sites_and_says_why_it_passed_over_flashinfer():
    load_plugins()
    r = OpResolver({"default": "auto"}, CUDA, 1)
    used = vars(r.scope(0, ("mlp", "norm_qkv", "attn_out", "decode_layer", "attention_prefill", "linear")))
    assert used  # callables were built
    t = r.table["0"]
    assert t["mlp"] == t["norm_qkv"] == t["attn_out"] == t["linear"] == "triton"
    assert t["decode_layer"] == "triton_chain"
    if torch.cuda.is_available():
        return  # the rest is about a machine without FlashInfer's GPU
    assert t["attention_prefill"] == "sdpa"
    assert "flashinfer" in r.reasons["attention_prefill"]
    assert "attention_prefill: auto passed over flashinfer" in r.summary()


def test_first_serving_backend_wins_and_cold_ones_are_passed_over(fake_backends):
    r = OpResolver({"default": "eager", "ops": {"silu_and_mul": "auto"}}, CPU, 3)
    for layer in range(3):
        r.scope(layer, ("silu_and_mul",))
    assert [r.table[str(i)]["silu_and_mul"] for i in range(3)] == ["t_any"] * 3
    assert len(fake_backends) == 1  # auto chooses once per op, not once per layer
    reason = r.reasons["silu_and_mul"]
    assert "t_missing: not installed" in reason and "t_gpu: device 'cpu'" in reason
    assert "t_cold: 2 JIT modules not built yet" in reason


def test_a_backend_named_explicitly_is_used_even_when_cold(fake_backends):
    r = OpResolver({"ops": {"silu_and_mul": "t_cold"}}, CPU, 1)
    r.scope(0, ("silu_and_mul",))
    assert r.table["0"]["silu_and_mul"] == "t_cold" and not fake_backends


def test_a_fallback_is_logged_once_not_once_per_layer(fake_backends, caplog):
    with caplog.at_level(logging.WARNING, logger="nanovllm.ops"):
        r = OpResolver({"ops": {"silu_and_mul": "t_gpu"}}, CPU, 4)
        for layer in range(4):
            r.scope(layer, ("silu_and_mul",))
    warnings = [rec for rec in caplog.records if "t_gpu" in rec.getMessage()]
    assert len(warnings) == 1 and "falling back to 'eager'" in warnings[0].getMessage()
    assert "falling back" in r.reasons["silu_and_mul"] and "eager for 1 op (silu_and_mul:" in r.summary()


def test_auto_is_a_valid_name_everywhere():
    from nanovllm.ops.registry import all_backends, backends_of

    assert "auto" in all_backends() and "auto" in backends_of("rms_norm")
    with pytest.raises(Exception, match="chosen by the resolver"):
        from nanovllm.ops import resolve

        resolve("rms_norm", "auto", CPU)
