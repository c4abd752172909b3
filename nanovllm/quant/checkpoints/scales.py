"""Checkpoint scales in QuantizedWeight's layout: float32 (out, groups) over groups of consecutive inputs."""

from __future__ import annotations

import torch


def row_group_scales(scale: torch.Tensor, out: int, in_features: int, block: tuple[int, int] | None = None,
                     group_size: int | None = None) -> tuple[torch.Tensor, int]:
    """(scales (out, groups) float32, group size) from a per-tensor (one value), per-channel ((out,) or (out, 1)),
    per-group ((out, groups)) or, when `block` (rows, cols) is given, block-wise
    (ceil(out / rows), ceil(in / cols)) scale; a block's scale is repeated over its rows."""
    s = scale.float()
    if block is not None:
        rows, cols = block
        expect = (-(-out // rows), -(-in_features // cols))
        if tuple(s.shape) != expect:
            raise ValueError(f"a ({out}, {in_features}) weight in blocks of {rows}x{cols} needs scales of shape "
                             f"{expect}, got {tuple(s.shape)}")
        return s.repeat_interleave(rows, dim=0)[:out].contiguous(), cols
    if s.numel() == 1:
        return s.reshape(1, 1).expand(out, 1).contiguous(), in_features
    if s.dim() == 1:
        s = s[:, None]
    if s.dim() != 2 or s.shape[0] != out:
        raise ValueError(f"scales of shape {tuple(scale.shape)} fit no layout of a ({out}, {in_features}) weight")
    groups = s.shape[1]
    g = group_size if group_size and group_size > 0 and groups > 1 else -(-in_features // groups)
    if -(-in_features // g) != groups:
        raise ValueError(f"{groups} scale groups do not tile {in_features} inputs in groups of {g}")
    return s.contiguous(), g
