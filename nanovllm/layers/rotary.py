"""RoPE tables. The inverse frequencies come from transformers' own rope functions for scaled variants
(llama3, yarn, linear, dynamic ...), so every family's config is read exactly as Hugging Face reads it."""

from __future__ import annotations

import torch


def rope_parameters(hf_config) -> dict:
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_freq_and_scale(hf_config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config)
    if layer_type is not None and isinstance(params.get(layer_type), dict):  # per-layer-type params (Gemma 3)
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scale)


def cos_sin_table(hf_config, head_dim: int, max_positions: int, layer_type: str | None = None) -> torch.Tensor:
    """(max_positions, head_dim) float32 rows [cos | sin] of head_dim / 2 frequencies each (NeoX layout)."""
    inv_freq, scale = inv_freq_and_scale(hf_config, head_dim, layer_type)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
