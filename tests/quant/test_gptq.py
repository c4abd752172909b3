"""GPTQ rounding: on correlated inputs its output error is below round-to-nearest's in the same format, and it
yields a regular QuantizedWeight (rtn's layout and grid); the `quantization_calibrate` values it is chosen with."""

from __future__ import annotations

import pytest
import torch

from nanovllm.quant import gptq, rtn
from nanovllm.quant.plan import QuantSpec, calibration_method


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k) rows with correlated columns of unequal magnitude, like a layer's activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix * (torch.rand(k, generator=g) * 3 + 0.1)


def output_error(x: torch.Tensor, w: torch.Tensor, q) -> float:
    ref = x @ w.T
    return ((x @ q.dequantize(torch.float32).T - ref).norm() / ref.norm()).item()


CASES = [("int4", 128, False), ("int4", 32, True), ("int4", 64, False), ("int8", None, True),
         ("fp8", None, True)]


@pytest.mark.parametrize("fmt, group, symmetric", CASES)
def test_gptq_beats_round_to_nearest_on_the_output(fmt, group, symmetric):
    x = correlated_inputs(512, 192)
    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(1)) * 0.05
    q = gptq.quantize(w, gptq.hessian(x), fmt, group, symmetric)
    nearest = rtn.quantize(w, fmt, group, symmetric)
    assert output_error(x, w, q) < 0.9 * output_error(x, w, nearest)


@pytest.mark.parametrize("fmt, group, symmetric", [*CASES, ("int4", 128, True)])
def test_gptq_result_is_a_regular_quantized_weight(fmt, group, symmetric):
    k = 200 if group == 128 else 192  # a partial last group too
    x, w = correlated_inputs(256, k), torch.randn(48, k, generator=torch.Generator().manual_seed(2))
    q = gptq.quantize(w, gptq.hessian(x), fmt, group, symmetric)
    nearest = rtn.quantize(w, fmt, group, symmetric)
    assert q.shape == nearest.shape == (48, k)
    assert (q.format, q.group_size, q.in_features, q.perm) == (nearest.format, nearest.group_size, k, None)
    assert q.qweight.dtype == nearest.qweight.dtype and q.qweight.shape == nearest.qweight.shape
    assert q.scale.shape == nearest.scale.shape and (q.offset is None) == (nearest.offset is None)
    # decoding by the format's definition: w[n, k] = code * scale[n, k // g] + offset[n, k // g]
    g = q.group_size
    if fmt == "int4":
        codes = torch.stack([q.qweight & 15, q.qweight >> 4], -1).flatten(1)[:, :k].float()
        codes = codes - (8 if q.offset is None else 0)
    else:
        codes = q.qweight.float()
    groups = torch.arange(k) // g
    expected = codes * q.scale.float()[:, groups] + (0 if q.offset is None else q.offset.float()[:, groups])
    torch.testing.assert_close(q.dequantize(torch.float32), expected)
    torch.testing.assert_close(q.linear(x), x @ expected.T, rtol=1e-4, atol=1e-4)


def test_dead_inputs_and_errors():
    x = correlated_inputs(128, 64)
    x[:, 5] = 0  # an input that is always zero: its column quantizes without spreading error
    w = torch.randn(16, 64)
    q = gptq.quantize(w, gptq.hessian(x), "int4", 32, False)
    assert q.dequantize(torch.float32)[:, 5].abs().max() <= q.scale.float().max()
    with pytest.raises(ValueError, match="Hessian must be"):
        gptq.quantize(w, torch.eye(32), "int4", 32)
    with pytest.raises(ValueError, match="asymmetric"):
        gptq.quantize(w, torch.eye(64), "int8", None, symmetric=False)


def test_calibration_method_values():
    assert calibration_method(False, "int4") == calibration_method("false", "int4") == ""
    assert calibration_method("GPTQ", "int4") == "gptq"
    assert calibration_method("gptq+awq", "int4") == calibration_method("awq,gptq", "int4") == "awq+gptq"
    assert calibration_method(True, "fp8") == "awq"
    spec = QuantSpec("int4", calibrate="awq+gptq")
    assert spec.awq and spec.gptq and "GPTQ rounding" in spec.describe()
    assert not QuantSpec("int4").gptq
    with pytest.raises(ValueError, match="quantization_calibrate='hqq' is not one of awq, gptq"):
        QuantSpec("int4", calibrate="hqq")


def test_engine_config_and_cli_take_the_method():
    from nanovllm.cli import to_hydra
    from nanovllm.config import EngineConfig

    assert EngineConfig(model="m", quantization="int4", quantization_calibrate="gptq").quantization_calibrate == "gptq"
    with pytest.raises(ValueError, match="quantization_calibrate"):
        EngineConfig(model="m", quantization="int4", quantization_calibrate="nope")
    with pytest.raises(ValueError, match="quantization_calibrate set without quantization"):
        EngineConfig(model="m", quantization_calibrate="gptq")
    assert "engine.quantization_calibrate=true" in to_hydra("run", ["--quantization-calibrate"]).argv
    assert "engine.quantization_calibrate=gptq" in to_hydra("run", ["--quantization-calibrate=gptq"]).argv


def test_hydra_override_takes_the_method():
    from tests.config.test_hydra_configs import compose_run

    cfg = compose_run(["engine.quantization=int4", "engine.quantization_calibrate=awq+gptq"])
    assert cfg.engine.quantization_calibrate == "awq+gptq"


def test_calibration_gives_hessians_for_gptq(hf_model, tmp_path):
    from nanovllm.quant.awq import calibrate

    hf_model.save_pretrained(tmp_path)
    spec = QuantSpec("int4", group_size=32, skip=frozenset({1}), calibrate="awq+gptq")
    cal = calibrate(tmp_path, hf_model.config, spec, ids=list(range(3, 60)))
    names = {f"layers.0.{w}" for w in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
    assert set(cal.hessians) | set(cal.gptq_inputs) == names and set(cal.scales) == names - {"layers.0.o_proj"}
    w = torch.randn(8, hf_model.config.hidden_size)
    assert cal.hessian("layers.0.qkv_proj", "cpu").shape == (w.shape[1], w.shape[1])
    assert cal.hessian("layers.0.lm_head", "cpu") is None
    q = cal.quantizer(spec)("layers.0.qkv_proj", w)
    assert (q.format, q.group_size, q.shape) == ("int4", 32, tuple(w.shape))


def test_sequential_calibration_fits_each_weight_to_quantized_inputs(hf_model, tmp_path):
    """Each weight's Hessian comes from the inputs the quantized weights before it produce, within a layer too:
    the o projection's from the quantized qkv projection's output."""
    from nanovllm.quant.awq import calibrate, dense_cpu_model, run_weights

    hf_model.save_pretrained(tmp_path)
    spec, ids = QuantSpec("int4", group_size=32, calibrate="gptq"), list(range(3, 60))
    sequential = calibrate(tmp_path, hf_model.config, spec, ids=ids, sequential=True)
    dense = calibrate(tmp_path, hf_model.config, spec, ids=ids, sequential=False)
    first = "layers.0.qkv_proj"  # nothing quantized before it: the same inputs either way
    torch.testing.assert_close(sequential.hessian(first, "cpu"), dense.hessian(first, "cpu"))
    assert not torch.allclose(sequential.hessian("layers.0.o_proj", "cpu"), dense.hessian("layers.0.o_proj", "cpu"))

    model, inputs = dense_cpu_model(tmp_path, hf_model.config), {}
    weights = {name: w.data.clone() for name, w in
               ((f"layers.{i}.{n}", getattr(layer, n)) for i, layer in enumerate(model.layers)
                for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))}

    def quantized_before(name, x):  # the weights quantized in turn, as calibration does
        inputs[name] = x
        return sequential.quantizer(spec)(name, weights[name]).dequantize(torch.float32)

    run_weights(model, ids, quantized_before)
    for name in ("layers.0.o_proj", "layers.1.qkv_proj", "layers.1.down_proj"):
        torch.testing.assert_close(sequential.hessian(name, "cpu"), gptq.hessian(inputs[name]), rtol=1e-4, atol=1e-5)


def test_quantize_writer_rounds_with_gptq(hf_model, tmp_path, monkeypatch):
    from nanovllm.quant import awq
    from nanovllm.quant.checkpoints import quantized_tensors
    from nanovllm.quantize import main

    hf_model.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(awq, "calibration_ids", lambda path: list(range(3, 60)))  # the tiny model has no tokenizer
    main([str(tmp_path / "dense"), str(tmp_path / "out"), "--method", "int4", "--group-size", "32", "--calibrate"])
    got = dict(quantized_tensors(tmp_path / "out", None))
    w = hf_model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    q = got["model.layers.0.mlp.down_proj.weight"]
    nearest = rtn.quantize(w, "int4", 32, scale_dtype=torch.float16)
    assert (q.format, q.group_size, q.shape) == ("int4", 32, tuple(w.shape))
    assert not torch.equal(q.qweight, nearest.qweight)  # GPTQ's codes, not round to nearest
    with pytest.raises(SystemExit):
        main([str(tmp_path / "dense"), str(tmp_path / "out2"), "--method", "int4", "--calibrate", "awq"])
