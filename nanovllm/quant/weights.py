"""Quantized linear weights: one container for every format the engine reads natively.

A `QuantizedWeight` stands where a dense (out, in) weight Parameter stands in a layer. It holds the packed
values and their per-group scales as buffers (so `.to(device)` and state dicts carry them), and knows its
logical shape. Every format decodes, per group of `group_size` consecutive input columns of one output row, as

    w[n, k] = q[n, k] * scale[n, k // group_size] + offset[n, k // group_size]      (offset None: 0)

with q read from `qweight` as the format says:
- "fp8":  qweight float8_e4m3fn (out, in); offset None (block-wise 128x128 scales are stored per row and group).
- "int8": qweight int8 (out, in), q signed; offset None for symmetric weights (GGUF Q5_K keeps one).
- "int4": qweight uint8 (out, ceil(in / 2)): column 2j in the low nibble, 2j + 1 in the high one; q unsigned
  0..15; offset None means the symmetric zero point 8, i.e. w = (q - 8) * scale.
Scales and offsets are float32 or the compute dtype; kernels read them as float32. `perm` (act-order
checkpoints) is the input permutation the columns were stored in: y = x[..., perm] @ W.T, where W is the
stored matrix. The dense reference of each op (`dequantize`, `linear`) is the semantics every kernel matches.

On the CPU, `linear` keeps each weight's dense form after its first use, until its quantized tensors change or
are replaced: dequantized at every call, a CPU decode step was mostly dequantization (SmolLM2-135M from its Q4_1
GGUF). The CPU path is the reference and the test bed, so it trades the memory of a dense copy for that.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = ("fp8", "int8", "int4")
QTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}
# bits of qweight per weight element
BITS = {"fp8": 8, "int8": 8, "int4": 4}


class QuantizedWeight(nn.Module):
    def __init__(self, fmt: str, qweight: torch.Tensor, scale: torch.Tensor, group_size: int, in_features: int,
                 offset: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; supported: {', '.join(FORMATS)}")
        if qweight.dtype != QTYPES[fmt]:
            raise ValueError(f"{fmt} weights are stored as {QTYPES[fmt]}, got {qweight.dtype}")
        out = qweight.shape[0]
        groups = -(-in_features // group_size)
        if scale.shape != (out, groups) or (offset is not None and offset.shape != scale.shape):
            raise ValueError(f"{fmt} weight ({out}, {in_features}) in groups of {group_size} needs scales of shape "
                             f"({out}, {groups}), got {tuple(scale.shape)}"
                             + ("" if offset is None else f" and offsets {tuple(offset.shape)}"))
        self.format, self.group_size, self.in_features, self.dtype = fmt, group_size, in_features, dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("perm", perm)
        self._dense: tuple[tuple, torch.Tensor] | None = None  # (what it was made from, the CPU's dense weight)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def shape(self) -> torch.Size:
        """The logical (out, in) shape, as the dense weight it replaces has."""
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes a kernel reads for this weight: values, scales, offsets."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.offset) if t is not None)

    def values(self) -> torch.Tensor:
        """q as float32 (out, in): signed for fp8/int8, unsigned 0..15 for int4."""
        q = self.qweight
        if self.format == "int4":
            q = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)[:, : self.in_features]
        return q.float()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in the stored column order (see `perm`)."""
        q = self.values()
        expand = lambda t: t.float().repeat_interleave(self.group_size, dim=1)[:, : self.in_features]  # noqa: E731
        offset = self.offset
        if offset is None and self.format == "int4":
            offset = -8 * self.scale.float()
        w = q * expand(self.scale)
        if offset is not None:
            w = w + expand(offset)
        return w.to(dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The native reference: dequantize, then a dense matmul in x's dtype."""
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return torch.nn.functional.linear(x, self.dense(x.dtype), bias)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """dequantize(dtype), kept on the CPU (see the module's docstring) while the quantized tensors it was
        made from are the same objects, unchanged in place (their version counters)."""
        if self.device.type != "cpu" or torch.compiler.is_compiling():
            return self.dequantize(dtype)
        tensors = [t for t in (self.qweight, self.scale, self.offset) if t is not None]
        made_from = (dtype, [t._version for t in tensors], tensors)
        kept = self._dense[0] if self._dense is not None else None
        if kept is None or kept[:2] != made_from[:2] or any(a is not b for a, b in zip(kept[2], tensors)):
            self._dense = (made_from, self.dequantize(dtype))
        return self._dense[1]

    def map_rows(self, fn) -> QuantizedWeight:
        """A copy with fn applied to the output rows of values, scales and offsets alike (a weight layout that
        reorders rows, e.g. interleaved gate/up)."""
        offset = None if self.offset is None else fn(self.offset)
        return QuantizedWeight(self.format, fn(self.qweight), fn(self.scale), self.group_size, self.in_features,
                               offset, self.perm, self.dtype)

    def extra_repr(self) -> str:
        extra = (", offset" if self.offset is not None else "") + (", act-order" if self.perm is not None else "")
        return f"{self.format}, ({self.out_features}, {self.in_features}), group {self.group_size}{extra}"


def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights quantized separately (q, k, v or gate, up) packed along the output dim into one."""
    first = parts[0]
    for p in parts[1:]:
        same = (p.format, p.group_size, p.in_features, p.offset is None, p.perm is None)
        if same != (first.format, first.group_size, first.in_features, first.offset is None, first.perm is None):
            raise ValueError(f"cannot pack {p.extra_repr()} with {first.extra_repr()}: formats differ")
        if p.perm is not None and not torch.equal(p.perm, first.perm):
            raise ValueError("cannot pack act-order weights with different input permutations")
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return QuantizedWeight(first.format, cat("qweight"), cat("scale"), first.group_size, first.in_features,
                           cat("offset"), first.perm, first.dtype)


def is_quantized(weight) -> bool:
    return isinstance(weight, QuantizedWeight)
