"""GPTQ rounding (Frantar et al. 2022): quantize a weight's input columns one at a time and spread each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error on calibration inputs, H = 2 X^T X / n.

The grid is rtn.py's: a group's scale (and int4 zero point) is computed from the group's columns, as updated by
the error of the columns before it, when its first column comes up; codes, scales and packing are rtn's, so the
result is a plain QuantizedWeight (no act-order permutation) that every kernel reads. Columns go in blocks of
BLOCK (a multiple of the group size): within a block the error updates column by column, beyond it once per
block. Everything is float32 on the weight's device.
"""

from __future__ import annotations

import torch

from nanovllm.quant.rtn import decoded, group_params, pack_int4, round_to_grid, search_clip
from nanovllm.quant.weights import FORMATS, QuantizedWeight

BLOCK = 128           # columns whose error updates the rest of the weight at once
CODE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}
# added to H's diagonal, relative to its mean: keeps H invertible and, heavier than the paper's 0.01, keeps the
# rounding from fitting the few calibration tokens at the expense of other text
DAMPING = 0.1


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n (in, in) of a layer's inputs x (tokens, in), in float32."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2 * x.T @ x / max(len(x), 1)


def inverse_hessian_factor(h: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), H damped by `damping` times its mean diagonal (more,
    tenfold at a time, while H is not positive definite)."""
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1  # inputs that are always zero: their columns' error goes nowhere
    mean_diag = h.diagonal().mean()
    for _ in range(6):
        damped = h + damping * mean_diag * torch.eye(len(h), device=h.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        damping *= 10
    raise ValueError("the calibration Hessian is not positive definite even with heavy damping")


def quantize(w: torch.Tensor, h: torch.Tensor, fmt: str, group_size: int | None = None, symmetric: bool = True,
             scale_dtype: torch.dtype = torch.float32, damping: float = DAMPING,
             clip_search: bool = False) -> QuantizedWeight:
    """GPTQ-quantize w (out, in) to `fmt` for inputs with Hessian h (in, in); group_size None means one group per
    output channel. The same format, grouping and grid conventions as rtn.quantize. clip_search: each group's
    range shrunk to its least squared rounding error, weighted per input column by H's diagonal (the inputs'
    mean square), as rtn.quantize's."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; supported: {', '.join(FORMATS)}")
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"the Hessian must be ({w.shape[1]}, {w.shape[1]}) for a weight of {w.shape[1]} inputs, "
                         f"got {tuple(h.shape)}")
    if not symmetric and fmt != "int4":
        raise ValueError(f"{fmt} weights are quantized symmetrically; asymmetric (zero point) is int4 only")
    out, k = w.shape
    g = group_size or k
    cols = -(-k // g) * g
    weight = torch.zeros(out, cols, dtype=torch.float32, device=w.device)
    weight[:, :k] = w.float()
    padded_h = torch.zeros(cols, cols, dtype=torch.float32, device=w.device)
    padded_h[:k, :k] = h.float().to(w.device)  # padding columns: zero inputs, zero weights, no error to spread
    u = inverse_hessian_factor(padded_h, damping)
    weight[:, padded_h.diagonal() == 0] = 0

    block = g * -(-BLOCK // g) if g < cols else cols  # whole groups per block; per-channel: one block
    codes = torch.empty(out, cols, dtype=CODE_DTYPES[fmt], device=w.device)
    scales = torch.empty(out, cols // g, dtype=torch.float32, device=w.device)
    zeros = torch.empty(out, cols // g, dtype=torch.float32, device=w.device) if not symmetric else None
    for start in range(0, cols, block):
        end = min(start + block, cols)
        part, u_part = weight[:, start:end].clone(), u[start:end, start:end]
        errors = torch.empty_like(part)
        for i in range(end - start):
            col = start + i
            if col % g == 0:
                group = part[:, i: i + g].unsqueeze(1)
                ratio = search_clip(group, fmt, symmetric, padded_h.diagonal()[col: col + g]) if clip_search else 1.0
                scale, zero = group_params(group, fmt, symmetric, ratio)
                scale = scale[:, 0].to(scale_dtype).float()  # the scale as stored is the grid the rest sees
                zero = None if zero is None else zero[:, 0]
                scales[:, col // g] = scale
                if zeros is not None:
                    zeros[:, col // g] = zero
            column = part[:, i: i + 1]
            q = round_to_grid(column, scale, zero, fmt, symmetric)
            codes[:, col] = q[:, 0]
            offset = None if zero is None else -zero * scale
            error = (column[:, 0] - decoded(q, scale, offset, fmt, symmetric)[:, 0]) / u_part[i, i]
            part[:, i:] -= error[:, None] * u_part[i, i:][None, :]
            errors[:, i] = error
        weight[:, end:] -= errors @ u[start:end, end:]
    q = codes[:, :k]
    offset = None if zeros is None else (-zeros * scales).to(scale_dtype)
    if fmt == "int4":
        q = pack_int4(q)
    return QuantizedWeight(fmt, q.contiguous(), scales.to(scale_dtype), g, k, offset, dtype=w.dtype)
