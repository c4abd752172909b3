"""Joining the shards of a packed weight (q/k/v, gate/up) that came quantized, possibly in different formats.

A GGUF Q4_K_M file stores some v_proj / down_proj tensors in Q6_K (int8) beside Q4_K (int4) ones, and the
groups of the two differ. `pack_rows` widens the shards to one format and one group size without changing a
single decoded value, then packs them with `cat_rows`.
"""

from __future__ import annotations

import math

import torch

from nanovllm.quant.weights import BITS, QuantizedWeight, cat_rows


def packed_format(formats) -> str:
    """The one format that holds every shard's values exactly: int4 widens to int8; fp8 does not mix with ints."""
    formats = set(formats)
    if len(formats) == 1:
        return formats.pop()
    if "fp8" in formats:
        raise ValueError(f"cannot pack fp8 with {sorted(formats - {'fp8'})} weights into one matrix")
    return max(formats, key=BITS.__getitem__)


def widen(w: QuantizedWeight, fmt: str, group_size: int, with_offset: bool) -> QuantizedWeight:
    """The same decoded weight stored as `fmt` in groups of `group_size` (which divides w's), with an explicit
    offset when `with_offset`: int4 values 0..15 become int8 values, the symmetric zero point an offset."""
    if group_size <= 0 or w.group_size % group_size:
        raise ValueError(f"group size {group_size} does not divide the weight's {w.group_size}")
    if fmt != w.format and not (w.format == "int4" and fmt == "int8"):
        raise ValueError(f"cannot store {w.format} weights as {fmt} exactly")
    q, scale, offset = w.qweight, w.scale, w.offset
    if fmt != w.format:
        q = w.values().to(torch.int8)  # 0..15; the zero point moves into the offset
    if offset is None and (with_offset or fmt != w.format):
        offset = -8 * scale if w.format == "int4" else torch.zeros_like(scale)  # int4's implicit zero point 8
    repeat = w.group_size // group_size
    groups = -(-w.in_features // group_size)
    expand = lambda t: t if t is None or repeat == 1 else t.repeat_interleave(repeat, dim=1)[:, :groups]  # noqa: E731
    return QuantizedWeight(fmt, q.contiguous(), expand(scale), group_size, w.in_features, expand(offset), w.perm,
                           w.dtype)


def pack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Shards (in shard order) packed along the output dim into one QuantizedWeight, widened where they differ."""
    if len(parts) == 1:
        return parts[0]
    fmt = packed_format(p.format for p in parts)
    group = math.gcd(*(p.group_size for p in parts))
    with_offset = any(p.offset is not None for p in parts) or (fmt == "int8" and any(p.format == "int4" for p in parts))
    same = all((p.format, p.group_size, p.offset is not None) == (fmt, group, with_offset) for p in parts)
    return cat_rows(parts if same else [widen(p, fmt, group, with_offset) for p in parts])


def dense_weight(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in) weight in the input's own column order (an act-order permutation undone)."""
    stored = w.dequantize(dtype)
    if w.perm is None:
        return stored
    dense = torch.empty_like(stored)
    dense[:, w.perm.long()] = stored
    return dense
