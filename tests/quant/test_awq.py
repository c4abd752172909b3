"""Activation-aware scales: folding them into the norms and up rows leaves the dense model's function
unchanged, and calibration yields a scale and an importance for every quantized weight."""

from __future__ import annotations

import torch

from nanovllm.models.loader import iter_tensors, load_weights, weight_files
from nanovllm.quant.awq import Calibration, calibrate, dense_cpu_model, run_weights
from nanovllm.quant.plan import QuantSpec
from tests.quant.conftest import build


def layer_inputs(model, ids: list[int]) -> dict[str, torch.Tensor]:
    """The inputs (tokens, in) every layer linear weight meets on `ids` in a dense CPU model."""
    inputs: dict[str, torch.Tensor] = {}
    run_weights(model, ids, inputs.__setitem__)
    return inputs


def test_folded_scales_keep_the_function(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    a = hf_model.config
    scales = {name: torch.rand(n, generator=g) + 0.5 for name, n in (
        ("layers.0.qkv_proj", a.hidden_size), ("layers.1.gate_up_proj", a.hidden_size),
        ("layers.1.down_proj", a.intermediate_size))}
    calibration = Calibration(scales)
    ids = list(range(3, 40))
    plain = dense_cpu_model(tmp_path, a)
    folded, _ = build(a)
    load_weights(folded, iter_tensors(weight_files(tmp_path)), torch.float32, transform=calibration.transform)
    ref, got = layer_inputs(plain, ids), layer_inputs(folded, ids)
    # inputs divided by s, weights' columns times s: every product, and so every later activation, is unchanged
    torch.testing.assert_close(got["layers.0.qkv_proj"] * scales["layers.0.qkv_proj"], ref["layers.0.qkv_proj"])
    torch.testing.assert_close(got["layers.1.down_proj"] * scales["layers.1.down_proj"], ref["layers.1.down_proj"])
    torch.testing.assert_close(got["layers.1.o_proj"], ref["layers.1.o_proj"])


def test_calibration_covers_every_quantized_weight(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    spec = QuantSpec("int4", group_size=32, skip=frozenset({1}), calibrate=True)
    cal = calibrate(tmp_path, hf_model.config, spec, ids=list(range(3, 60)))
    assert set(cal.importance) == {f"layers.0.{w}" for w in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
    assert set(cal.scales) == {"layers.0.qkv_proj", "layers.0.gate_up_proj", "layers.0.down_proj"}
    assert all((s > 0).all() for s in cal.scales.values())
