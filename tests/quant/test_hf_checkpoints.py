"""Pre-quantized Hugging Face checkpoints read into QuantizedWeights: Qwen-style block FP8, compressed-tensors
(built with the compressed-tensors library itself, which also dequantizes the reference), GPTQ (act-order,
sym and asym, 4 and 8 bits) and AWQ written in their documented on-disk layouts, each checked against a
reference dequantizer written here from the format's definition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nanovllm.quant.checkpoints import detect, quantized_tensors, weight_formats
from nanovllm.quant.weights import QuantizedWeight

torch.manual_seed(0)


def write_folder(path, tensors: dict[str, torch.Tensor], quantization_config: dict | None):
    path.mkdir(exist_ok=True)
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def read(path) -> dict:
    return dict(quantized_tensors(path, None))


# --- block FP8 (quant_method "fp8", Qwen's -FP8 releases) ------------------------------------------------------

def test_fp8_block_scales(tmp_path):
    out, k = 200, 300  # neither a multiple of the 128x128 blocks
    q = (torch.randn(out, k) * 50).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3) + 0.01
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    norm = torch.randn(k)
    path = write_folder(tmp_path / "fp8", {"model.layers.0.mlp.down_proj.weight": q,
                                           "model.layers.0.mlp.down_proj.weight_scale_inv": scale_inv,
                                           "model.norm.weight": norm}, qc)
    assert detect(path, None) == "fp8"
    assert weight_formats(path, None) == {"model.layers.0.mlp.down_proj.weight": "fp8"}
    got = read(path)
    assert set(got) == {"model.layers.0.mlp.down_proj.weight", "model.norm.weight"}
    assert torch.equal(got["model.norm.weight"], norm)
    qw = got["model.layers.0.mlp.down_proj.weight"]
    assert qw.format == "fp8" and qw.shape == (out, k) and qw.group_size == 128
    assert torch.equal(qw.qweight.view(torch.uint8), q.view(torch.uint8))  # the fp8 bytes kept
    # reference: every element times the scale of its 128x128 block
    rows, cols = torch.arange(out)[:, None] // 128, torch.arange(k)[None, :] // 128
    assert torch.equal(qw.dequantize(torch.float32), q.float() * scale_inv[rows, cols])


# --- compressed-tensors, built and dequantized by the library ------------------------------------------------

def ct_case(strategy: str, fmt: str, symmetric: bool = True, out: int = 96, k: int = 160):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
    )
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind = {"fp8": ("float", 8), "int8": ("int", 8), "int4": ("int", 4)}[fmt]
    extra = {"group": dict(group_size=32), "block": dict(block_structure=[64, 64])}.get(strategy, {})
    args = QuantizationArgs(num_bits=kind[1], type=kind[0], strategy=strategy, symmetric=symmetric, **extra)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    shape = {"tensor": (1,), "channel": (out, 1), "group": (out, -(-k // 32)),
             "block": (-(-out // 64), -(-k // 64))}[strategy]
    state = {"weight": torch.randn(out, k), "weight_scale": torch.rand(shape) * 0.05 + 0.01}
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-4, 4, shape, dtype=torch.int8)
    compressor = {"fp8": FloatQuantizationCompressor, "int8": IntQuantizationCompressor,
                  "int4": PackedQuantizationCompressor}[fmt]
    stored = compressor.compress(state, scheme)
    reference = compressor.decompress(dict(stored), scheme)["weight"].float()
    layout = {"fp8": "float-quantized", "int8": "int-quantized", "int4": "pack-quantized"}[fmt]
    qc = ct.QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=layout,
                               quantization_status="compressed").model_dump(mode="json")
    return stored, reference, qc


CT_CASES = [("channel", "fp8", True), ("tensor", "fp8", True), ("block", "fp8", True), ("channel", "int8", True),
            ("group", "int4", True), ("group", "int4", False), ("channel", "int4", False), ("group", "int8", False)]


@pytest.mark.parametrize("strategy, fmt, symmetric", CT_CASES)
def test_compressed_tensors_match_the_library(tmp_path, strategy, fmt, symmetric):
    stored, reference, qc = ct_case(strategy, fmt, symmetric)
    base = "model.layers.0.self_attn.o_proj"
    path = write_folder(tmp_path / "ct", {f"{base}.{k}": v for k, v in stored.items()}
                        | {"lm_head.weight": torch.randn(10, 160)}, qc)
    assert detect(path, None) == "compressed-tensors"
    assert weight_formats(path, None) == {f"{base}.weight": fmt}
    got = read(path)
    assert set(got) == {f"{base}.weight", "lm_head.weight"}
    qw = got[f"{base}.weight"]
    assert isinstance(qw, QuantizedWeight) and qw.format == fmt and qw.shape == reference.shape
    assert (qw.offset is None) == symmetric
    torch.testing.assert_close(qw.dequantize(torch.float32), reference, rtol=1e-6, atol=1e-7)


# --- GPTQ ------------------------------------------------------------------------------------------------------

def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack along dim 0: word [r, c] holds q[r * per + i, c] at bits [bits * i, ...)."""
    per = 32 // bits
    words = np.zeros((q.shape[0] // per, q.shape[1]), dtype=np.uint64)
    for i in range(per):
        words |= q[i::per].astype(np.uint64) << np.uint64(bits * i)
    return words.astype(np.uint32).view(np.int32)


def pack_cols(q: np.ndarray, bits: int, order=None) -> np.ndarray:
    """Pack along dim 1: word [r, c] holds q[r, c * per + order[i]] at bits [bits * i, ...)."""
    per = 32 // bits
    order = order or list(range(per))
    words = np.zeros((q.shape[0], q.shape[1] // per), dtype=np.uint64)
    for i in range(per):
        words |= q[:, order[i]::per].astype(np.uint64) << np.uint64(bits * i)
    return words.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq(tmp_path, bits, sym, act_order):
    rng = np.random.default_rng(bits + 2 * sym + 4 * act_order)
    out, k, gs = 48, 96, 32
    groups, top = k // gs, (1 << bits) - 1
    q = rng.integers(0, top + 1, (k, out))  # (in, out), as GPTQ stores it
    # v1 convention: the stored zero is the zero point minus one (a symmetric checkpoint stores 2**(bits-1) - 1)
    zero = np.full((groups, out), 1 << (bits - 1)) if sym else rng.integers(1, top + 1, (groups, out))
    scales = (rng.random((groups, out)) * 0.05 + 0.01).astype(np.float16)
    g_idx = np.arange(k) // gs
    if act_order:  # GPTQ quantizes columns in the order perm; column perm[j] falls in group j // gs
        perm = rng.permutation(k)
        g_idx = np.empty(k, dtype=np.int64)
        g_idx[perm] = np.arange(k) // gs
    tensors = {"model.layers.1.mlp.up_proj.qweight": torch.from_numpy(pack_rows(q, bits)),
               "model.layers.1.mlp.up_proj.qzeros": torch.from_numpy(pack_cols(zero - 1, bits)),
               "model.layers.1.mlp.up_proj.scales": torch.from_numpy(scales),
               "model.layers.1.mlp.up_proj.g_idx": torch.from_numpy(g_idx.astype(np.int32)),
               "model.layers.1.mlp.up_proj.bias": torch.randn(out)}
    qc = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": act_order, "sym": sym,
          "checkpoint_format": "gptq"}
    path = write_folder(tmp_path / "gptq", tensors, qc)
    assert detect(path, None) == "gptq"
    fmt = "int4" if bits == 4 else "int8"
    assert weight_formats(path, None) == {"model.layers.1.mlp.up_proj.weight": fmt}
    got = read(path)
    assert set(got) == {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.bias"}
    qw = got["model.layers.1.mlp.up_proj.weight"]
    # reference: w[n, k] = scales[g, n] * (q[k, n] - (stored zero + 1)), g = g_idx[k]
    ref = (scales[g_idx].astype(np.float32) * (q - zero[g_idx]).astype(np.float32)).T
    assert qw.format == fmt and (qw.offset is None) == sym and (qw.perm is None) == (not act_order)
    stored_order = qw.perm.numpy() if act_order else np.arange(k)
    assert np.array_equal(qw.dequantize(torch.float32).numpy(), ref[:, stored_order])
    x = torch.randn(3, k)
    # float32 sums of the same products in another order: a few ulps of the largest partial sums apart
    torch.testing.assert_close(qw.linear(x), x @ torch.from_numpy(ref).T, rtol=1e-4, atol=1e-4)


def test_gptq_v2_zero_points_and_uneven_g_idx(tmp_path):
    from nanovllm.quant.checkpoints.gptq import group_order, repack

    q = np.random.default_rng(0).integers(0, 16, (64, 8))
    zeros = np.full((2, 8), 8)  # v2 stores the zero point itself
    qw = repack(torch.from_numpy(pack_rows(q, 4)), torch.from_numpy(pack_cols(zeros, 4)),
                torch.ones(2, 8, dtype=torch.float16), None, 4, 32, zero_shift=0)
    assert qw.offset is None and torch.equal(qw.dequantize(torch.float32), torch.from_numpy(q.T - 8).float())
    with pytest.raises(ValueError, match="groups of 32"):
        group_order(torch.tensor([0] * 40 + [1] * 24), 32)


# --- AWQ -------------------------------------------------------------------------------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("zeros_at_middle", [False, True])
def test_awq(tmp_path, zeros_at_middle):
    rng = np.random.default_rng(7)
    out, k, gs = 64, 128, 64
    q = rng.integers(0, 16, (k, out))
    zero = np.full((k // gs, out), 8) if zeros_at_middle else rng.integers(0, 16, (k // gs, out))
    scales = (rng.random((k // gs, out)) * 0.05 + 0.01).astype(np.float16)
    tensors = {"model.layers.0.self_attn.q_proj.qweight": torch.from_numpy(pack_cols(q, 4, AWQ_ORDER)),
               "model.layers.0.self_attn.q_proj.qzeros": torch.from_numpy(pack_cols(zero, 4, AWQ_ORDER)),
               "model.layers.0.self_attn.q_proj.scales": torch.from_numpy(scales),
               "model.embed_tokens.weight": torch.randn(12, k)}
    qc = {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True, "version": "gemm"}
    path = write_folder(tmp_path / "awq", tensors, qc)
    assert detect(path, None) == "awq"
    assert weight_formats(path, None) == {"model.layers.0.self_attn.q_proj.weight": "int4"}
    qw = read(path)["model.layers.0.self_attn.q_proj.weight"]
    g = np.arange(k) // gs
    ref = ((q - zero[g]).astype(np.float32) * scales[g].astype(np.float32)).T  # w = (q - z) * s
    assert (qw.offset is None) == zeros_at_middle
    assert np.array_equal(qw.dequantize(torch.float32).numpy(), ref)


def test_dense_and_unknown_checkpoints(tmp_path):
    path = write_folder(tmp_path / "dense", {"lm_head.weight": torch.randn(4, 4)}, None)
    assert detect(path, None) is None
    with pytest.raises(ValueError, match="dense checkpoint"):
        weight_formats(path, None)
    path = write_folder(tmp_path / "bnb", {"lm_head.weight": torch.randn(4, 4)}, {"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match="'bitsandbytes' is not supported"):
        detect(path, None)


def test_compressed_tensors_act_order_g_idx():
    """Older compressed-tensors GPTQ checkpoints carry weight_g_idx: w[n, k] = q[n, k] * s[n, g_idx[k]]."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from nanovllm.quant.checkpoints.compressed_tensors import repack

    out, k, gs = 16, 64, 16
    q = torch.randint(-8, 8, (out, k), dtype=torch.int8)
    scale = (torch.rand(out, k // gs) + 0.1).half().float()  # 11-bit scales: every product exact
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[torch.randperm(k)] = (torch.arange(k) // gs).int()
    stored = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([out, k]), "weight_scale": scale,
              "weight_g_idx": g_idx}
    qw = repack(stored, {"num_bits": 4, "strategy": "group", "group_size": gs})
    ref = q.float() * scale[:, g_idx.long()]
    assert torch.equal(qw.dequantize(torch.float32), ref[:, qw.perm])
    x = torch.randn(2, k)
    torch.testing.assert_close(qw.linear(x), x @ ref.T)


def test_unsupported_layouts_are_named():
    from nanovllm.quant.checkpoints import compressed_tensors, gptq

    with pytest.raises(ValueError, match="checkpoint_format 'marlin' is not supported"):
        gptq._settings(None, type("C", (), {"quantization_config": {"bits": 4, "checkpoint_format": "marlin"}}))
    qc = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}}
    with pytest.raises(ValueError, match="format nvfp4-pack-quantized is not supported"):
        compressed_tensors._config(None, type("C", (), {"quantization_config": qc}))
