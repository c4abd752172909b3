"""Writing quantized checkpoints: `python -m nanovllm.quantize` on a tiny random model writes GPTQ or
compressed-tensors folders that read back as the very QuantizedWeights quantized (round trip), whose
config.json transformers loads, and whose compressed-tensors layers the library itself decompresses to the
same weights."""

from __future__ import annotations

import json

import pytest
import torch

from nanovllm.quant.checkpoints import detect, quantized_tensors, weight_formats
from nanovllm.quant.checkpoints.writer import write_checkpoint
from nanovllm.quant.rtn import quantize
from nanovllm.quant.weights import QuantizedWeight


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import Qwen3Config

    from nanovllm.checkpoints import write_random_checkpoint

    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False)
    dest = tmp_path_factory.mktemp("tiny") / "dense"
    write_random_checkpoint(config, dest, tokenizer=False, dtype=torch.float32)
    (dest / "tokenizer_config.json").write_text("{}")
    return dest


def dense_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert (a.format, a.group_size, a.in_features) == (b.format, b.group_size, b.in_features)
    assert torch.equal(a.qweight.view(torch.uint8), b.qweight.view(torch.uint8))
    assert torch.equal(a.scale.float(), b.scale.float())
    for x, y in ((a.offset, b.offset), (a.perm, b.perm)):
        assert (x is None) == (y is None) and (x is None or torch.equal(x.float(), y.float()))


CASES = [("int4", None, "gptq", 32, torch.float16), ("int4", "compressed-tensors", "compressed-tensors", 32,
                                                      torch.float32),
         ("int8", None, "compressed-tensors", None, torch.float32), ("fp8", None, "compressed-tensors", None,
                                                                     torch.float32)]


@pytest.mark.parametrize("method, layout, detected, group, scale_dtype", CASES)
def test_quantize_cli_round_trip(tiny_folder, tmp_path, method, layout, detected, group, scale_dtype):
    from transformers import AutoConfig

    from nanovllm.quantize import main

    out = tmp_path / "out"
    main([str(tiny_folder), str(out), "--method", method] + (["--group-size", str(group)] if group else [])
         + (["--layout", layout] if layout else []))
    assert detect(out, None) == detected and (out / "tokenizer_config.json").is_file()
    dense = dense_tensors(tiny_folder)
    linears = {n for n in dense if n.endswith("_proj.weight")}
    assert weight_formats(out, None) == dict.fromkeys(linears, method)
    got = dict(quantized_tensors(out, None))
    assert got.keys() == dense.keys()
    for name, w in dense.items():
        if name in linears:
            assert_same(got[name], quantize(w, method, group, scale_dtype=scale_dtype))
        else:
            assert torch.equal(got[name], w), name  # lm_head, embeddings and norms as they were
    config = AutoConfig.from_pretrained(str(out))
    assert config.quantization_config["quant_method"] == detected


def test_gptq_config_loads_in_transformers(tiny_folder, tmp_path):
    from transformers import GPTQConfig

    from nanovllm.quantize import quantize_folder

    qc = json.loads((quantize_folder(tiny_folder, tmp_path / "q", "int4", 32) / "config.json").read_text())
    gptq = GPTQConfig.from_dict(qc["quantization_config"])
    assert (gptq.bits, gptq.group_size, gptq.sym, gptq.desc_act) == (4, 32, True, False)


@pytest.mark.parametrize("method, layout", [("fp8", None), ("int8", None), ("int4", "compressed-tensors")])
def test_compressed_tensors_library_reads_what_we_write(tiny_folder, tmp_path, method, layout):
    """The library parses our quantization_config and decompresses each layer to our dequantized weight."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
    )
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from nanovllm.quantize import quantize_folder

    out = quantize_folder(tiny_folder, tmp_path / "q", method, None, layout=layout)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    CompressedTensorsConfig.from_dict(dict(qc))
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    compressor = {"fp8": FloatQuantizationCompressor, "int8": IntQuantizationCompressor,
                  "int4": PackedQuantizationCompressor}[method]
    stored, ours = load_file(str(out / "model.safetensors")), dict(quantized_tensors(out, None))
    base = "model.layers.1.mlp.down_proj"
    layer = {k.removeprefix(base + "."): v for k, v in stored.items() if k.startswith(base + ".")}
    theirs = compressor.decompress(layer, scheme)["weight"].float()
    torch.testing.assert_close(theirs, ours[base + ".weight"].dequantize(torch.float32), rtol=1e-6, atol=1e-7)


def test_asymmetric_and_act_order_int4_round_trip(tmp_path):
    """Zero points and act-order permutations survive GPTQ (act-order groups come back with each group's
    columns in ascending order, as written here)."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    asym = quantize(w, "int4", 16, symmetric=False)
    # zero points as GPTQ holds them: integers times float16 scales, in 1..15 (v1 stores z - 1)
    scale = asym.scale.to(torch.float16).float()
    zeros = torch.round(-asym.offset / asym.scale).clamp(1, 15)
    asym = QuantizedWeight("int4", asym.qweight, scale, 16, 64, -(zeros * scale))
    groups = torch.tensor([2, 0, 3, 1])  # stored group j holds original columns of group groups[j], ascending
    perm = (groups[:, None] * 16 + torch.arange(16)).flatten()
    act = QuantizedWeight("int4", asym.qweight, scale, 16, 64, asym.offset, perm)
    for qw in (asym, act):
        out = write_checkpoint({"model.layers.0.mlp.down_proj.weight": qw}, tmp_path / str(id(qw)), "int4",
                               {"model_type": "qwen3"})
        back = dict(quantized_tensors(out, None))["model.layers.0.mlp.down_proj.weight"]
        assert_same(back, qw)
        x = torch.randn(2, 64)
        torch.testing.assert_close(back.linear(x), qw.linear(x))


def test_writer_errors_name_the_problem(tmp_path):
    w = quantize(torch.randn(12, 64), "int4", 32)
    with pytest.raises(ValueError, match="multiple"):
        write_checkpoint({"a.weight": w}, tmp_path / "a", "int4", {})
    with pytest.raises(ValueError, match="needs int8 QuantizedWeights; got int4"):
        write_checkpoint({"a.weight": w}, tmp_path / "b", "int8", {})
    with pytest.raises(ValueError, match="written as compressed-tensors"):
        write_checkpoint({"a.weight": w}, tmp_path / "c", "fp8", {}, layout="gptq")


def test_module_with_quantized_weights_is_written(tmp_path):
    """A module whose linear holds a QuantizedWeight in place of its weight Parameter writes like a mapping."""
    from torch import nn

    model = nn.Module()
    model.up_proj = nn.Linear(64, 32)
    qw = quantize(torch.randn(32, 64), "int8")
    del model.up_proj.weight
    model.up_proj.weight = qw
    out = write_checkpoint(model, tmp_path / "m", "int8", {"model_type": "qwen3"})
    got = dict(quantized_tensors(out, None))
    assert got.keys() == {"up_proj.weight", "up_proj.bias"}
    assert_same(got["up_proj.weight"], qw)
    assert torch.equal(got["up_proj.bias"], model.up_proj.bias.detach())


def test_quantizing_a_quantized_checkpoint_is_refused(tmp_path):
    from nanovllm.quantize import quantize_folder

    q = write_checkpoint({"a.weight": quantize(torch.randn(8, 64), "fp8")}, tmp_path / "fp8", "fp8", {})
    with pytest.raises(ValueError, match="already quantized"):
        quantize_folder(q, tmp_path / "again", "int8")
