"""Quantized weights in the model: placeholders, loading (dynamic RTN and pre-quantized through the checkpoint
readers' interface, faked here), the decode_layer bundle, weight layouts and the weight report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nanovllm.models.loader import load_weights
from nanovllm.ops import get_op, register_impl
from nanovllm.quant.plan import QuantSpec
from nanovllm.quant.report import weight_stats, weights_line
from nanovllm.quant.rtn import quantize
from nanovllm.quant.source import quantizer, weight_source
from nanovllm.quant.weights import QuantizedWeight
from tests.quant.conftest import build

# the quantization error of each format, relative to the weight's largest magnitude
TOLERANCE = {"fp8": 0.07, "int8": 0.01, "int4": 0.15}


def hf_tensors(hf_model):
    return iter(hf_model.state_dict().items())


def dense_qkv(hf_model, i):
    attn = hf_model.model.layers[i].self_attn
    return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])


def assert_close_to(qw, dense, fmt):
    err = (qw.dequantize(torch.float32) - dense).abs().max() / dense.abs().max()
    assert err < TOLERANCE[fmt], f"{fmt}: relative error {err:.3f}"


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_dynamic_quantization_installs_every_linear_weight(hf_model, fmt):
    spec = QuantSpec(fmt, group_size=32)
    model, _ = build(hf_model.config, spec.weight_formats(2))
    assert model.layers[0].qkv_proj.device.type == "meta"  # a placeholder: no dense copy allocated
    load_weights(model, hf_tensors(hf_model), torch.float32, quantize=quantizer(spec))
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            w = getattr(layer, name)
            assert isinstance(w, QuantizedWeight) and w.format == fmt, name
        assert layer.decode_weights.qkv_w is layer.qkv_proj and layer.decode_weights.down_w is layer.down_proj
        assert_close_to(layer.qkv_proj, dense_qkv(hf_model, layer.idx), fmt)
    assert model.lm_head.__class__ is torch.nn.Parameter  # the LM head stays dense by default
    torch.testing.assert_close(model.embed, hf_model.model.embed_tokens.weight)


def test_skipped_layers_and_quantized_lm_head(hf_model):
    spec = QuantSpec("int8", skip=frozenset({1}), lm_head=True)
    model, resolver = build(hf_model.config, spec.weight_formats(2))
    load_weights(model, hf_tensors(hf_model), torch.float32, quantize=quantizer(spec))
    assert isinstance(model.layers[0].o_proj, QuantizedWeight)
    assert isinstance(model.layers[1].o_proj, torch.nn.Parameter)
    torch.testing.assert_close(model.layers[1].qkv_proj, dense_qkv(hf_model, 1))
    assert isinstance(model.lm_head, QuantizedWeight)
    assert_close_to(model.lm_head, hf_model.lm_head.weight, "int8")
    assert resolver.scope_formats == {"0": {"int8"}, "1": {"dense"}, "model": {"int8"}}


def test_tied_lm_head_quantized_from_the_embeddings(hf_model):
    from transformers import Qwen3ForCausalLM

    config = hf_model.config.__class__(**{**hf_model.config.to_dict(), "tie_word_embeddings": True})
    tied = Qwen3ForCausalLM(config).eval()
    spec = QuantSpec("int4", group_size=32, lm_head=True)
    model, _ = build(config, spec.weight_formats(2))
    tensors = [(n, t) for n, t in tied.state_dict().items() if n != "lm_head.weight"]
    load_weights(model, iter(tensors), torch.float32, quantize=quantizer(spec))
    assert isinstance(model.lm_head, QuantizedWeight) and isinstance(model.embed, torch.nn.Parameter)
    assert_close_to(model.lm_head, tied.model.embed_tokens.weight, "int4")


def rtn(t, fmt, group):
    """int4 with a zero point (as GPTQ/AWQ store it), int8 symmetric."""
    return quantize(t, fmt, group, symmetric=fmt != "int4")


def fake_readers(hf_model, method="gptq"):
    """The checkpoint readers' interface (detect / weight_formats / quantized_tensors) over an in-memory model:
    q/k/o/gate/up in int4 groups of 32, v and down in int8 groups of 16 (as GGUF Q4_K_M mixes Q4_K and Q6_K)."""
    def fmt(name):
        return ("int8", 16) if name.endswith(("v_proj.weight", "down_proj.weight")) else ("int4", 32)

    def linear(name):
        return "layers." in name and name.endswith("_proj.weight")

    def tensors(path, hf_config):
        for name, t in hf_model.state_dict().items():
            yield name, rtn(t, *fmt(name)) if linear(name) else t

    return SimpleNamespace(
        detect=lambda path, hf_config: method,
        weight_formats=lambda path, hf_config: {n: fmt(n)[0] for n in hf_model.state_dict() if linear(n)},
        quantized_tensors=tensors)


def test_prequantized_checkpoint_through_the_readers(hf_model, tmp_path):
    readers = fake_readers(hf_model)
    source = weight_source(tmp_path, hf_model.config, SimpleNamespace(quantization=None), readers=readers)
    assert source.description == "gptq checkpoint" and source.quantize is None
    assert source.formats["layers.0.qkv_proj"] == "int8"  # int4 q/k beside int8 v pack as int8
    assert source.formats["layers.0.gate_up_proj"] == "int4" and source.formats["layers.1.down_proj"] == "int8"
    model, resolver = build(hf_model.config, source.formats)
    load_weights(model, source.tensors(), torch.float32)
    qkv = model.layers[0].qkv_proj
    assert qkv.format == "int8" and qkv.group_size == 16
    parts = [rtn(t, *f).dequantize(torch.float32) for t, f in
             ((hf_model.model.layers[0].self_attn.q_proj.weight, ("int4", 32)),
              (hf_model.model.layers[0].self_attn.k_proj.weight, ("int4", 32)),
              (hf_model.model.layers[0].self_attn.v_proj.weight, ("int8", 16)))]
    torch.testing.assert_close(qkv.dequantize(torch.float32), torch.cat(parts))
    assert resolver.scope_formats["0"] == {"int4", "int8"}


def test_prequantized_checkpoint_refuses_dynamic_quantization(hf_model, tmp_path):
    with pytest.raises(ValueError, match=r"already quantized \(awq\); leave quantization unset"):
        weight_source(tmp_path, hf_model.config, SimpleNamespace(quantization="int4"),
                      readers=fake_readers(hf_model, "awq"))


def test_quantized_tensor_for_a_dense_weight_is_dequantized(hf_model, tmp_path):
    readers = fake_readers(hf_model)
    model, _ = build(hf_model.config, {})  # every weight dense: the checkpoint's are dequantized into them
    load_weights(model, readers.quantized_tensors(tmp_path, hf_model.config), torch.float32)
    assert isinstance(model.layers[0].qkv_proj, torch.nn.Parameter)
    dense = hf_model.model.layers[0].self_attn.o_proj.weight
    assert (model.layers[0].o_proj - dense).abs().max() < TOLERANCE["int4"] * dense.abs().max()


def test_dense_checkpoint_for_a_quantized_placeholder_needs_a_quantizer(hf_model):
    model, _ = build(hf_model.config, {"layers.0.o_proj": "int8"})
    with pytest.raises(ValueError, match="o_proj is int8 but checkpoint tensor .* is dense and no quantization"):
        load_weights(model, hf_tensors(hf_model), torch.float32)


def interleave(t):
    """Rows (gate 0..I-1, up 0..I-1) -> (gate 0, up 0, gate 1, up 1, ...)."""
    half = t.shape[0] // 2
    return torch.stack((t[:half], t[half:]), 1).flatten(0, 1)


def test_weight_layouts_apply_to_quantized_weights(hf_model):
    @register_impl("mlp", "test_int4_interleaved", formats=("int4",), layouts={"gate_up_w": lambda w: w.map_rows(
        interleave)})
    def mlp(h, gate_up_w, down_w, residual):
        raise AssertionError("not called")

    try:
        spec = QuantSpec("int4", group_size=32)
        model, resolver = build(hf_model.config, spec.weight_formats(2), {"default": "eager",
                                                                           "ops": {"mlp": "test_int4_interleaved"}})
        assert resolver.table["0"]["mlp"] == "test_int4_interleaved"
        load_weights(model, hf_tensors(hf_model), torch.float32, quantize=quantizer(spec))
        before = model.layers[0].gate_up_proj.dequantize(torch.float32)
        model.apply_weight_layouts(resolver)
        after = model.layers[0].gate_up_proj
        assert isinstance(after, QuantizedWeight)
        torch.testing.assert_close(after.dequantize(torch.float32), interleave(before))
        assert model.layers[0].decode_weights.gate_up_w is after
    finally:
        del get_op("mlp").impls["test_int4_interleaved"]


def test_weight_report(hf_model):
    spec = QuantSpec("int4", group_size=32)
    model, _ = build(hf_model.config, spec.weight_formats(2))
    load_weights(model, hf_tensors(hf_model), torch.float32, quantize=quantizer(spec))
    stats = weight_stats(model)
    dense_total = sum(p.numel() * 4 for p in hf_model.parameters())
    assert stats["num_quantized"] == 8 and stats["formats"] == {"int4": 8}
    assert stats["dense_equivalent_bytes"] == dense_total
    assert stats["quantized_bytes"] < (dense_total - stats["dense_bytes"]) / 4
    assert stats["num_params"] == sum(p.numel() for p in hf_model.parameters())
    line = weights_line(stats, spec.describe())
    assert "int4 (group 32, symmetric): 8 matrices" in line and "unquantized" in line


def test_cpu_linear_keeps_the_dense_weight_until_the_quantized_one_changes():
    """The CPU's native linear dequantizes once, not per call; a weight changed in place, or replaced, is
    dequantized again, and the output always equals dequantize-then-matmul."""
    torch.manual_seed(0)
    w = quantize(torch.randn(24, 40), "int4", group_size=8, symmetric=False)
    x = torch.randn(3, 40)
    want = lambda: x @ w.dequantize(torch.float32).T  # noqa: E731
    y = w.linear(x)
    dense = w._dense[1]
    assert torch.equal(y, want()) and w.linear(x) is not y and w._dense[1] is dense  # kept
    w.scale.mul_(2)  # in place: its version moves on
    assert torch.equal(w.linear(x), want()) and w._dense[1] is not dense
    dense = w._dense[1]
    w.qweight = w.qweight.clone().bitwise_xor_(0x11)  # a new tensor (version 0 again)
    assert torch.equal(w.linear(x), want()) and w._dense[1] is not dense
    assert w.linear(x.double()).dtype == torch.float64  # one dense weight per dtype asked for
