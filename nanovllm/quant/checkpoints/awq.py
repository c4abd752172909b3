"""AWQ checkpoints (quant_method "awq", AutoAWQ's GEMM layout), 4 bits.

Per quantized linear X: `X.qweight` int32 (in, out / 8) and `X.qzeros` int32 (groups, out / 8), both packed
along the output dim in AWQ's nibble order: output column 8c + ORDER[i] is nibble i of word c, with
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; `X.scales` (groups, out). The dense weight is
w[n, k] = (q[k, n] - z[k // group, n]) * scales[k // group, n].
Repacked as int4 (out, in) with scales and offsets float32 (out, groups); offset None when every zero is 8.
"""

from __future__ import annotations

import torch

from nanovllm.quant.checkpoints.detect import quantization_config
from nanovllm.quant.checkpoints.packing import unpack_int32
from nanovllm.quant.checkpoints.qweight_folder import repacked_tensors
from nanovllm.quant.checkpoints.safetensors_folder import SafetensorsFolder
from nanovllm.quant.rtn import pack_int4
from nanovllm.quant.weights import QuantizedWeight

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
SLOT_OF_COLUMN = [ORDER.index(j) for j in range(8)]  # [0, 4, 1, 5, 2, 6, 3, 7]
PARTS = (".qweight", ".qzeros", ".scales")


def _settings(path, hf_config) -> int:
    qc = quantization_config(path, hf_config) or {}
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"AWQ checkpoints of {bits} bits are not supported; supported: 4")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported; supported: 'gemm' (AutoAWQ's default)")
    return int(qc.get("group_size", qc.get("q_group_size", 128)))


def weight_formats(path, hf_config=None) -> dict[str, str]:
    _settings(path, hf_config)
    folder = SafetensorsFolder(path)
    return {name.removesuffix(".qweight") + ".weight": "int4" for name in folder.names() if name.endswith(".qweight")}


def repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
           dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    q = unpack_int32(qweight, 4, dim=1, order=SLOT_OF_COLUMN).T  # (out, in)
    out, k = q.shape
    z = unpack_int32(qzeros, 4, dim=1, order=SLOT_OF_COLUMN).T  # (out, groups)
    s = scales.float().T.contiguous()
    g = group_size if group_size > 0 else k
    if s.shape != (out, -(-k // g)) or z.shape != s.shape:
        raise ValueError(f"AWQ scales {tuple(scales.shape)} / zeros {tuple(qzeros.shape)} do not fit a ({out}, {k}) "
                         f"weight in groups of {g}")
    offset = None if bool((z == 8).all()) else -(z.float() * s)
    return QuantizedWeight("int4", pack_int4(q.to(torch.uint8)).contiguous(), s, g, k, offset, dtype=dtype)


def quantized_tensors(path, hf_config=None, dtype: torch.dtype = torch.bfloat16):
    group = _settings(path, hf_config)
    yield from repacked_tensors(path, "AWQ", PARTS[1:], PARTS[1:], lambda parts: repack(
        parts[".qweight"], parts[".qzeros"], parts[".scales"], group, dtype))
