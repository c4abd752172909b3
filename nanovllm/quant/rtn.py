"""Round-to-nearest quantization of a dense (out, in) weight into a QuantizedWeight.

Scales come from each group's absolute maximum (symmetric) or its range (asymmetric int4, with an offset),
computed in float32. These are the quantizers of dynamic quantization on load and of the tests' fixtures.

`clip_search` shrinks each group's range where that lowers the group's squared rounding error (outliers
clipped, the rest on a finer grid), optionally weighting each input column by `importance` (the mean squared
activation it meets, from calibration): the error that matters is that of the layer's output.
"""

from __future__ import annotations

import torch

from nanovllm.quant.weights import FORMATS, QuantizedWeight

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
CLIP_STEPS = 20          # shrink factors tried: 1, 1 - 0.5 / 20, ..., 0.5
CLIP_MAX_SHRINK = 0.5
SEARCH_ROWS = 4096       # rows searched at once (bounds the search's float32 temporaries)


def _groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """w as float32 (out, groups, group_size), zero-padded to whole groups."""
    out, k = w.shape
    groups = -(-k // group_size)
    padded = torch.zeros(out, groups * group_size, dtype=torch.float32, device=w.device)
    padded[:, :k] = w.float()
    return padded.view(out, groups, group_size), k


def group_params(x: torch.Tensor, fmt: str, symmetric: bool, ratio: torch.Tensor | float = 1.0):
    """(scale, zero) of grouped x (out, groups, g), each group's range shrunk by `ratio`: the grid `round_to_grid`
    rounds onto. zero is the asymmetric int4 zero point (None otherwise)."""
    zero = None
    if fmt == "fp8":
        scale = (x.abs().amax(-1) * ratio / FP8_MAX).clamp_min(1e-12)
    elif fmt == "int8":
        scale = (x.abs().amax(-1) * ratio / 127).clamp_min(1e-12)
    elif symmetric:  # int4, zero point 8: q - 8 in [-8, 7]
        scale = (x.abs().amax(-1) * ratio / 7).clamp_min(1e-12)
    else:  # int4 with an offset per group: w = q * scale + offset, q in [0, 15]
        lo, hi = x.amin(-1).clamp_max(0) * ratio, x.amax(-1).clamp_min(0) * ratio
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        zero = (-lo / scale).round()
    return scale, zero


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
                  symmetric: bool) -> torch.Tensor:
    """The codes of x (..., g) on the grid of (scale, zero) (...,): fp8, int8, or int4 as unsigned 0..15."""
    if fmt == "fp8":
        return (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if fmt == "int8":
        return (x / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    if symmetric:
        return ((x / scale[..., None]).round() + 8).clamp(0, 15).to(torch.uint8)
    return ((x / scale[..., None]).round() + zero[..., None]).clamp(0, 15).to(torch.uint8)


def _quantize_groups(x: torch.Tensor, fmt: str, symmetric: bool, ratio: torch.Tensor | float = 1.0):
    """(q, scale, offset) of grouped x (out, groups, g), each group's range shrunk by `ratio`."""
    scale, zero = group_params(x, fmt, symmetric, ratio)
    q = round_to_grid(x, scale, zero, fmt, symmetric)
    return q, scale, None if zero is None else -zero * scale


def decoded(q, scale, offset, fmt: str, symmetric: bool) -> torch.Tensor:
    """The values of codes q (..., g) with their group's scale and offset (...,)."""
    v = q.float() - (8 if fmt == "int4" and symmetric else 0)
    return v * scale[..., None] + (0 if offset is None else offset[..., None])


def search_clip(x: torch.Tensor, fmt: str, symmetric: bool, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per group of grouped x (out, groups, g): the range shrink factor in [0.5, 1] with the least (importance-
    weighted) squared rounding error."""
    weight = 1.0 if importance is None else importance.float().to(x.device).view(1, *x.shape[1:])
    best_err = torch.full(x.shape[:2], float("inf"), device=x.device)
    best = torch.ones(x.shape[:2], device=x.device)
    for i in range(CLIP_STEPS + 1):
        ratio = 1.0 - CLIP_MAX_SHRINK * i / CLIP_STEPS
        q, scale, offset = _quantize_groups(x, fmt, symmetric, ratio)
        err = ((decoded(q, scale, offset, fmt, symmetric) - x) ** 2 * weight).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None, symmetric: bool = True,
             scale_dtype: torch.dtype = torch.float32, clip_search: bool = False,
             importance: torch.Tensor | None = None) -> QuantizedWeight:
    """RTN-quantize w (out, in) to `fmt`; group_size None means one group per output channel (per-channel).
    clip_search: each group's range shrunk to its least squared error, weighted per input column by
    `importance` (in,) when given."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; supported: {', '.join(FORMATS)}")
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if not symmetric and fmt != "int4":
        raise ValueError(f"{fmt} weights are quantized symmetrically; asymmetric (zero point) is int4 only")
    g = group_size or w.shape[1]
    if importance is not None:
        if importance.shape != (w.shape[1],):
            raise ValueError(f"importance needs one value per input column ({w.shape[1]}), got "
                             f"{tuple(importance.shape)}")
        importance = torch.nn.functional.pad(importance.float(), (0, -w.shape[1] % g))
    parts = []
    for rows in range(0, w.shape[0], SEARCH_ROWS if clip_search else w.shape[0]):
        x, k = _groups(w[rows: rows + SEARCH_ROWS] if clip_search else w, g)
        ratio = search_clip(x, fmt, symmetric, importance) if clip_search else 1.0
        parts.append(_quantize_groups(x, fmt, symmetric, ratio))
        del x
    q = torch.cat([p[0] for p in parts]).flatten(1)[:, :k]
    scale = torch.cat([p[1] for p in parts]).to(scale_dtype)
    offset = None if symmetric or fmt != "int4" else torch.cat([p[2] for p in parts]).to(scale_dtype)
    if fmt == "int4":
        q = pack_int4(q)
    return QuantizedWeight(fmt, q.contiguous(), scale, g, k, offset, dtype=w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 as uint8 (out, ceil(in / 2)): column 2j in the low nibble, 2j + 1 in the high."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
