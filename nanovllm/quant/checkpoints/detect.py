"""Which quantization a checkpoint carries: a GGUF file, or a Hugging Face folder's config.json
`quantization_config` (its `quant_method`)."""

from __future__ import annotations

import json
from pathlib import Path

from nanovllm.quant.checkpoints.gguf_native import gguf_file

METHODS = ("gguf", "fp8", "gptq", "awq", "compressed-tensors")


def quantization_config(path, hf_config=None) -> dict | None:
    """The checkpoint's quantization_config as a dict: from hf_config when it has one, else config.json."""
    qc = getattr(hf_config, "quantization_config", None) if hf_config is not None else None
    if qc is None:
        config_file = Path(path) / "config.json"
        if config_file.is_file():
            qc = json.loads(config_file.read_text()).get("quantization_config")
    if qc is None or isinstance(qc, dict):
        return qc
    return qc.to_dict()


def detect(path, hf_config=None) -> str | None:
    """The checkpoint's quantization method (one of METHODS), or None for a dense checkpoint."""
    if gguf_file(path) is not None:
        return "gguf"
    qc = quantization_config(path, hf_config)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method not in METHODS[1:]:
        raise ValueError(f"{str(path)!r}: quantization method {qc.get('quant_method')!r} is not supported; "
                         f"supported: {', '.join(METHODS[1:])} (from config.json) and GGUF files")
    return method
