"""Fine-grained FP8 checkpoints (quant_method "fp8", as Qwen's own -FP8 releases and transformers' FP8 config
write them): each quantized linear is `X.weight` float8_e4m3fn (out, in) with `X.weight_scale_inv` float32
(ceil(out / 128), ceil(in / 128)), one scale per 128x128 block (`weight_block_size`); w = q * scale_inv.
The block scales become per-row group-128 scales, the fp8 values are kept as they are."""

from __future__ import annotations

import torch

from nanovllm.quant.checkpoints.detect import quantization_config
from nanovllm.quant.checkpoints.safetensors_folder import SafetensorsFolder
from nanovllm.quant.checkpoints.scales import row_group_scales
from nanovllm.quant.weights import QuantizedWeight

SCALE = "_scale_inv"
DROPPED = (".input_scale", ".activation_scale")  # static activation scales: weight-only reading ignores them


def _block(path, hf_config) -> tuple[int, int] | None:
    block = (quantization_config(path, hf_config) or {}).get("weight_block_size")
    return None if block is None else (int(block[0]), int(block[1]))


def weight_formats(path, hf_config=None) -> dict[str, str]:
    folder = SafetensorsFolder(path)
    return {name: "fp8" for name in folder.names() if name + SCALE in folder}


def quantized_tensors(path, hf_config=None, dtype: torch.dtype = torch.bfloat16):
    folder, block = SafetensorsFolder(path), _block(path, hf_config)
    for name in folder.names():
        if name.endswith(SCALE) or name.endswith(DROPPED):
            continue
        w = folder.get(name)
        if name + SCALE not in folder:
            yield name, w
            continue
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{name}: fp8 checkpoints store float8_e4m3fn weights, got {w.dtype}")
        out, k = w.shape
        scale, group = row_group_scales(folder.get(name + SCALE), out, k, block)
        yield name, QuantizedWeight("fp8", w, scale, group, k, dtype=dtype)
