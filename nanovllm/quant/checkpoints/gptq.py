"""GPTQ checkpoints (quant_method "gptq"; AutoGPTQ / GPTQModel / optimum layout), 4 or 8 bits.

Per quantized linear X: `X.qweight` int32 (in * bits / 32, out), packed along the input dim;
`X.qzeros` int32 (groups, out * bits / 32), packed along the output dim; `X.scales` (groups, out);
`X.g_idx` int32 (in,), the group of each input column (act-order checkpoints, desc_act, permute them).
The dense weight is  w[n, k] = scales[g, n] * (q[k, n] - z[g, n] - 1)  with g = g_idx[k], where the "- 1" is
the v1 format's zero-point convention (checkpoint_format "gptq"; "gptq_v2" stores z itself).

Repacked as int4 (or int8: q - 128) with the columns sorted by group (`perm`, so y = x[..., perm] @ W.T and
each group's columns are contiguous), scales and offsets float32 (out, groups); a symmetric checkpoint
(every zero point at the middle) keeps offset None.
"""

from __future__ import annotations

import torch

from nanovllm.quant.checkpoints.detect import quantization_config
from nanovllm.quant.checkpoints.packing import unpack_int32
from nanovllm.quant.checkpoints.qweight_folder import repacked_tensors
from nanovllm.quant.checkpoints.safetensors_folder import SafetensorsFolder
from nanovllm.quant.weights import QuantizedWeight

PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


def _settings(path, hf_config) -> tuple[int, int | None, int]:
    """(bits, group size or None for per-channel, the zero-point shift: 1 for v1, 0 for v2)."""
    qc = quantization_config(path, hf_config) or {}
    bits = int(qc.get("bits", 4))
    if bits not in (4, 8):
        raise ValueError(f"GPTQ checkpoints of {bits} bits are not supported; supported: 4, 8")
    group = int(qc.get("group_size", 128))
    layout = str(qc.get("checkpoint_format", "gptq")).lower()
    if layout not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {layout!r} is not supported; supported: gptq, gptq_v2")
    v2 = layout == "gptq_v2"
    return bits, group if group > 0 else None, 0 if v2 else 1


def weight_formats(path, hf_config=None) -> dict[str, str]:
    bits, _, _ = _settings(path, hf_config)
    folder = SafetensorsFolder(path)
    return {name.removesuffix(".qweight") + ".weight": "int4" if bits == 4 else "int8"
            for name in folder.names() if name.endswith(".qweight")}


def group_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The input permutation that makes each group's columns contiguous (None when they already are); every
    group but the last must have group_size columns."""
    k = g_idx.numel()
    g_idx = g_idx.long()
    if torch.equal(g_idx, torch.arange(k) // group_size):
        return None
    perm = torch.argsort(g_idx, stable=True)
    counts = torch.bincount(g_idx)
    expect = torch.full_like(counts, group_size)
    expect[-1] = k - group_size * (counts.numel() - 1)
    if not torch.equal(counts, expect):
        raise ValueError(f"g_idx does not split {k} inputs into groups of {group_size} (sizes {counts.tolist()})")
    return perm


def repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
           bits: int, group_size: int | None, zero_shift: int = 1,
           dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """One GPTQ linear as a QuantizedWeight (see the module docstring)."""
    q = unpack_int32(qweight, bits, dim=0).T  # (out, in), unsigned
    out, k = q.shape
    z = unpack_int32(qzeros, bits, dim=1)[:, :out].T + zero_shift  # (out, groups): the effective zero point
    s = scales.float().T.contiguous()
    g = group_size or k
    perm = None if g_idx is None else group_order(g_idx, g)
    if perm is not None:
        q = q[:, perm]
    middle = 1 << (bits - 1)
    if s.shape != (out, -(-k // g)) or z.shape != s.shape:
        raise ValueError(f"GPTQ scales {tuple(scales.shape)} / zeros {tuple(qzeros.shape)} do not fit a ({out}, {k}) "
                         f"weight in groups of {g}")
    offset = None if bool((z == middle).all()) else -(z.float() * s)
    if bits == 4:
        from nanovllm.quant.rtn import pack_int4

        return QuantizedWeight("int4", pack_int4(q.to(torch.uint8)).contiguous(), s, g, k, offset, perm, dtype)
    if offset is not None:  # int8 holds q - 128; fold the shift into the offset
        offset = -((z - middle).float() * s)
    return QuantizedWeight("int8", (q - middle).to(torch.int8).contiguous(), s, g, k, offset, perm, dtype)


def quantized_tensors(path, hf_config=None, dtype: torch.dtype = torch.bfloat16):
    bits, group, shift = _settings(path, hf_config)
    yield from repacked_tensors(path, "GPTQ", PARTS[1:], PARTS[1:3], lambda parts: repack(
        parts[".qweight"], parts[".qzeros"], parts[".scales"], parts.get(".g_idx"), bits, group, shift, dtype))
