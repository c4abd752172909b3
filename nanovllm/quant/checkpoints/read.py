"""The readers behind `weight_formats` and `quantized_tensors`, chosen by `detect`."""

from __future__ import annotations

import torch

from nanovllm.quant.checkpoints import awq, compressed_tensors, gguf_native, gptq, hf_fp8
from nanovllm.quant.checkpoints.detect import detect

READERS = {"gguf": gguf_native, "fp8": hf_fp8, "gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors}


def _reader(path, hf_config):
    method = detect(path, hf_config)
    if method is None:
        raise ValueError(f"{str(path)!r} is a dense checkpoint: it has no quantization_config and no .gguf file")
    return READERS[method]


def weight_formats(path, hf_config=None) -> dict[str, str]:
    """HF dense weight name -> "fp8" | "int8" | "int4" for every linear weight stored quantized (headers only)."""
    return _reader(path, hf_config).weight_formats(path, hf_config)


def quantized_tensors(path, hf_config=None, dtype: torch.dtype = torch.bfloat16):
    """(HF name, Tensor | QuantizedWeight) for every tensor of the checkpoint: each quantized linear as one
    QuantizedWeight (compute dtype `dtype`), the rest as stored."""
    return _reader(path, hf_config).quantized_tensors(path, hf_config, dtype)
