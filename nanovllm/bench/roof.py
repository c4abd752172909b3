"""Batch-1 roofline for the benchmark: bytes per token (all weights read once, LM head included, plus
the KV cache of the context) over the device's bandwidth (nanovllm.roofline)."""

from __future__ import annotations

import platform

import torch

from nanovllm.roofline import bytes_per_token, device_bandwidth, roofline_tok_s


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def bandwidth(device) -> tuple[float, str]:
    return device_bandwidth(device_name(device), device)


def table(model_info: dict, bw: float, source: str, contexts) -> dict:
    weights, kv = model_info["weight_bytes"], model_info["kv_bytes_per_token"]
    return dict(bandwidth=bw, bandwidth_source=source, weight_bytes=weights, kv_bytes_per_token=kv,
                by_context={str(c): roofline_tok_s(weights, kv, c, bw) for c in contexts},
                bytes_per_token={str(c): bytes_per_token(weights, kv, c) for c in contexts})


def tok_s(model_info: dict, bw: float, context: int) -> float:
    return roofline_tok_s(model_info["weight_bytes"], model_info["kv_bytes_per_token"], context, bw)


def pct(measured_tok_s: float | None, model_info: dict, bw: float, context: int) -> float | None:
    return None if measured_tok_s is None else 100.0 * measured_tok_s / tok_s(model_info, bw, context)
