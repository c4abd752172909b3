"""The resolver per layer's weight formats: weight-reading ops need a backend that reads every format of the
layer, other ops ignore formats; auto ranks quantized backends first for quantized layers only."""

from __future__ import annotations

import pytest
import torch

from nanovllm.ops import OpResolver, RegistryError, Target, get_op, register_impl
from nanovllm.ops import auto as auto_mod
from nanovllm.ops.registry import reads_weights
from nanovllm.ops.resolver import parse_layers
from nanovllm.quant.plan import LAYER_WEIGHTS, QuantSpec, checkpoint_formats

CPU = Target("cpu", torch.float32)
OPS = ("rms_norm", "linear", "norm_qkv", "add_rms_norm", "silu_and_mul", "mlp")


@pytest.fixture
def int4_linear():
    register_impl("linear", "test_int4", formats=("int4",))(lambda x, w, b=None: w.linear(x, b))
    yield "test_int4"
    del get_op("linear").impls["test_int4"]


FORMATS = {**{f"layers.0.{w}": "int4" for w in LAYER_WEIGHTS}, "layers.1.qkv_proj": "int4",
           "layers.1.down_proj": "int8"}


def resolve_all(kernels):
    r = OpResolver(kernels, CPU, 3, FORMATS)
    for i in range(3):
        r.scope(i, OPS, LAYER_WEIGHTS)
    return r


def test_weight_reading_ops_need_every_format_of_the_layer(int4_linear):
    r = resolve_all({"default": "eager", "ops": {"linear": int4_linear, "rms_norm": "compile"}})
    assert r.table["0"]["linear"] == int4_linear  # int4 only
    assert r.table["1"]["linear"] == "eager"      # int4 + int8 + dense: not all read
    assert r.table["2"]["linear"] == "eager"      # dense
    assert "weights not in ['int4']" in r.reasons["linear"]
    assert {r.table[s]["rms_norm"] for s in "012"} == {"compile"}  # ops without weights ignore formats
    assert r.scope_formats == {"0": {"int4"}, "1": {"int4", "int8", "dense"}, "2": {"dense"}}
    assert "int4 weights in layers 0" in r.summary() and "dense+int4+int8 weights in layers 1" in r.summary()


def test_auto_ranks_quantized_backends_first_for_quantized_layers(int4_linear, monkeypatch):
    monkeypatch.setitem(auto_mod.QUANT_RANKING, "cpu", {"linear": (int4_linear,)})
    r = resolve_all({"default": "auto"})
    assert r.table["0"]["linear"] == int4_linear
    assert r.table["2"]["linear"] == "eager" and r.table["0"]["rms_norm"] == "eager"


def test_sites_that_read_weights():
    assert reads_weights("linear") and reads_weights("mlp") and reads_weights("decode_layer")
    assert reads_weights("lm_head_sample") and reads_weights("moe_mlp")
    assert not reads_weights("rms_norm") and not reads_weights("rope_decode_attention")


def test_quantized_backend_names_resolve_to_eager_until_installed():
    r = OpResolver({"ops": {"linear": "triton_quant", "mlp": "triton_quant"}}, CPU, 1, {"layers.0.o_proj": "fp8"})
    r.scope(0, OPS, LAYER_WEIGHTS)
    if "triton_quant" not in r.table["0"].values():  # the kernels may be installed (and serve the CPU) or not
        assert r.table["0"]["linear"] == "eager"


def test_checkpoint_formats_by_parameter_name():
    formats = checkpoint_formats({
        "model.language_model.layers.0.self_attn.q_proj.weight": "int4",
        "model.language_model.layers.0.self_attn.v_proj.weight": "int8",
        "model.layers.2.mlp.down_proj.weight": "fp8", "lm_head.weight": "int8",
        "model.layers.0.mlp.experts.3.gate_proj.weight": "int4"})  # experts stay dense
    assert formats == {"layers.0.qkv_proj": "int8", "layers.2.down_proj": "fp8", "lm_head": "int8"}
    with pytest.raises(ValueError, match="unknown format 'q3'"):
        checkpoint_formats({"lm_head.weight": "q3"})


def test_spec_formats_skip_layers():
    formats = QuantSpec("fp8", skip=frozenset({0})).weight_formats(2)
    assert set(formats) == {f"layers.1.{w}" for w in LAYER_WEIGHTS} and set(formats.values()) == {"fp8"}


def test_parse_layers_first_last():
    assert parse_layers("first,last", 28) == {0, 27}
    assert parse_layers("first-2,25-last", 28) == {0, 1, 2, 25, 26, 27}
    with pytest.raises(RegistryError, match="quantization_skip='0-40': layers .* outside 0..27"):
        parse_layers("0-40", 28, key="quantization_skip")
    with pytest.raises(RegistryError, match="quantization_skip='lst'"):
        parse_layers("lst", 28, key="quantization_skip")
