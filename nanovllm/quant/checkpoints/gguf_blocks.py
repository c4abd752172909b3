"""GGUF block formats repacked into QuantizedWeight, keeping every bit: each block's integers and scales are
moved, never requantized, and `QuantizedWeight.dequantize()` in float32 equals `gguf.quants.dequantize`
bit for bit (each scale and offset is the float32 product llama.cpp's reference forms, and the decode
q * scale + offset rounds exactly as its d * q - m does).

GGUF rows are the weight's output rows; blocks run along the input dim. Per format (ggml's block layouts):
- Q8_0 (34 bytes / 32): fp16 d, 32 int8 q; w = q * d                       -> int8, group 32
- Q4_0 (18 bytes / 32): fp16 d, 16 bytes of nibbles; w = (q - 8) * d        -> int4, group 32, zero point 8
- Q4_1 (20 bytes / 32): fp16 d, fp16 m, nibbles; w = q * d + m              -> int4, group 32, offset m
- Q5_0 (22 bytes / 32): fp16 d, 4 bytes of fifth bits (bit j: element j), nibbles; w = (q - 16) * d
                                                                          -> int8 values q - 16, group 32
- Q5_1 (24 bytes / 32): fp16 d, fp16 m, fifth bits, nibbles; w = q * d + m  -> int8 0..31, group 32, offset m
- Q4_K (144 bytes / 256): fp16 d, dmin, 12 bytes of 6-bit (sc, m) x 8, 128 bytes of nibbles;
  w = q * (d * sc) - dmin * m per 32                                       -> int4, group 32, offset
- Q5_K (176 bytes / 256): as Q4_K plus 32 bytes of fifth bits; q in 0..31  -> int8, group 32, offset
- Q6_K (210 bytes / 256): 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d;
  w = (q - 32) * (d * sc) per 16                                          -> int8, group 16
"""

from __future__ import annotations

import numpy as np
import torch

from nanovllm.quant.rtn import pack_int4
from nanovllm.quant.weights import QuantizedWeight

NATIVE_TYPES = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q5_0": "int8", "Q5_1": "int8", "Q4_K": "int4",
                "Q5_K": "int8", "Q6_K": "int8"}
_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per element along the last axis as float16, widened to float32 (exact)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2, n): the low nibbles, then the high ones."""
    return np.stack((qs & 0x0F, qs >> 4), axis=-2)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), axis=-1)
    mn = np.concatenate((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def repack(data: np.ndarray, type_name: str, in_features: int, dtype: torch.dtype = torch.bfloat16
           ) -> QuantizedWeight:
    """The GGUF rows `data` (rows, bytes per row), uint8, of block type `type_name`, as a QuantizedWeight."""
    if type_name not in _BLOCK:
        raise ValueError(f"GGUF type {type_name} is not read natively; native types: {', '.join(_BLOCK)}")
    per_block, nbytes = _BLOCK[type_name]
    rows = data.shape[0]
    if in_features % per_block or data.shape[1] != in_features // per_block * nbytes:
        raise ValueError(f"GGUF {type_name} rows of {in_features} weights take {in_features // per_block} blocks of "
                         f"{nbytes} bytes; got {data.shape[1]} bytes per row")
    b = np.asarray(data, dtype=np.uint8).reshape(rows, in_features // per_block, nbytes)
    offset = None
    if type_name == "Q8_0":
        fmt, group, scale = "int8", 32, _f16(b[..., 0:2])
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8)
    elif type_name in ("Q4_0", "Q4_1"):
        fmt, group, scale = "int4", 32, _f16(b[..., 0:2])
        if type_name == "Q4_1":
            offset = _f16(b[..., 2:4])
        q = _nibbles(b[..., -16:])  # element j < 16: low nibble of byte j; j >= 16: high nibble of byte j - 16
    elif type_name in ("Q5_0", "Q5_1"):
        fmt, group, scale = "int8", 32, _f16(b[..., 0:2])
        if type_name == "Q5_1":
            offset = _f16(b[..., 2:4])
        qh = b[..., -20:-16][..., :, None] >> np.arange(8, dtype=np.uint8)  # 32 bits, little-endian
        q = (_nibbles(b[..., -16:]).reshape(rows, -1, 32) | ((qh.reshape(rows, -1, 32) & 1) << 4)).astype(np.int8)
        if type_name == "Q5_0":
            q = q - np.int8(16)
    elif type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = _k_scale_min(b[..., 4:16])
        fmt = "int4" if type_name == "Q4_K" else "int8"
        group, scale, offset = 32, d * sc, -(dmin * mn)
        # 128 bytes as 4 chunks of 32: sub-block 2c is chunk c's low nibbles, 2c + 1 its high ones
        q = _nibbles(b[..., -128:].reshape(rows, -1, 4, 32))
        if type_name == "Q5_K":  # bit i of the 32 high bytes is the fifth bit of sub-block i
            qh = b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]
            q = (q.reshape(rows, -1, 8, 32) | ((qh & 1) << 4)).astype(np.int8)
    else:  # Q6_K
        ql, qh = b[..., 0:128], b[..., 128:192]
        scales = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
        fmt, group, scale = "int8", 16, _f16(b[..., 208:210])[..., None] * scales
        low = _nibbles(ql.reshape(rows, -1, 2, 64)).reshape(rows, -1, 8, 32)  # (half, nibble, 64 bytes)
        high = (qh.reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
        q = (low | (high.reshape(rows, -1, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(rows, in_features))
    if fmt == "int4":
        q = pack_int4(q)
    as_groups = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(rows, -1))  # noqa: E731
    return QuantizedWeight(fmt, q.contiguous(), as_groups(scale), group, in_features,
                           None if offset is None else as_groups(offset), dtype=dtype)
