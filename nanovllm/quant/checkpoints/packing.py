"""Integers packed into int32 words, as GPTQ, AWQ and compressed-tensors store them: value i of a word in
bits [bits * i, bits * (i + 1)), low bits first."""

from __future__ import annotations

import torch


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """The unsigned values (int32) of `packed` (int32), unpacked along `dim` (each word becomes 32 / bits
    consecutive elements). `order[j]` is the slot in the word of the word's j-th element (AWQ); None: slot j."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights are int32, got {packed.dtype}")
    per = 32 // bits
    slots = torch.arange(per, dtype=torch.int32) * bits
    if order is not None:
        slots = slots[torch.tensor(order)]
    p = packed.movedim(dim, -1)
    values = (p[..., None] >> slots) & ((1 << bits) - 1)
    return values.flatten(-2).movedim(-1, dim)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned values (< 2**bits) packed along `dim` into int32 words (the inverse of unpack_int32, order None);
    a partial last word is zero-padded."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    v = torch.nn.functional.pad(v, (0, -v.shape[-1] % per))
    v = v.reshape(*v.shape[:-1], -1, per) << (torch.arange(per) * bits)
    words = v.sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    return words.movedim(-1, dim).contiguous()
