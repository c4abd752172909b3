"""Round-to-nearest quantization of a dense (out, in) weight into a QuantizedWeight.

Scales come from each group's absolute maximum (symmetric) or its range (asymmetric int4, with an offset),
computed in float32. These are the quantizers of dynamic quantization on load and of the tests' fixtures.
"""

from __future__ import annotations

import torch

from nanovllm.quant.weights import FORMATS, QuantizedWeight

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """w as float32 (out, groups, group_size), zero-padded to whole groups."""
    out, k = w.shape
    groups = -(-k // group_size)
    padded = torch.zeros(out, groups * group_size, dtype=torch.float32, device=w.device)
    padded[:, :k] = w.float()
    return padded.view(out, groups, group_size), k


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None, symmetric: bool = True,
             scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """RTN-quantize w (out, in) to `fmt`; group_size None means one group per output channel (per-channel)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; supported: {', '.join(FORMATS)}")
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if not symmetric and fmt != "int4":
        raise ValueError(f"{fmt} weights are quantized symmetrically; asymmetric (zero point) is int4 only")
    g = group_size or w.shape[1]
    x, k = _groups(w, g)
    offset = None
    if fmt == "fp8":
        scale = (x.abs().amax(-1) / FP8_MAX).clamp_min(1e-12)
        q = (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    elif fmt == "int8":
        scale = (x.abs().amax(-1) / 127).clamp_min(1e-12)
        q = (x / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    elif symmetric:  # int4, zero point 8: q - 8 in [-8, 7]
        scale = (x.abs().amax(-1) / 7).clamp_min(1e-12)
        q = ((x / scale[..., None]).round() + 8).clamp(0, 15).to(torch.uint8)
    else:  # int4 with an offset per group: w = q * scale + offset, q in [0, 15]
        lo, hi = x.amin(-1).clamp_max(0), x.amax(-1).clamp_min(0)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        zero = (-lo / scale).round()
        q = ((x / scale[..., None]).round() + zero[..., None]).clamp(0, 15).to(torch.uint8)
        offset = (-zero * scale).to(scale_dtype)
    q = q.flatten(1)[:, :k]
    if fmt == "int4":
        q = pack_int4(q)
    return QuantizedWeight(fmt, q.contiguous(), scale.to(scale_dtype), g, k, offset, dtype=w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 as uint8 (out, ceil(in / 2)): column 2j in the low nibble, 2j + 1 in the high."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
