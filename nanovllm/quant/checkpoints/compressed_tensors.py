"""compressed-tensors checkpoints (quant_method "compressed-tensors", as llm-compressor and vLLM write them).

Per quantized linear X, by the format the tensors carry:
- float-quantized / naive (fp8): `X.weight` float8_e4m3fn (out, in), `X.weight_scale`;
- int-quantized / naive (int8): `X.weight` int8 (out, in), `X.weight_scale`, `X.weight_zero_point` if asymmetric;
- pack-quantized (4 or 8 bits): `X.weight_packed` int32 (out, in * bits / 32), element i of a row at bits
  [bits * i, ...) stored as q + 2**(bits - 1); `X.weight_shape`; `X.weight_scale`; `X.weight_zero_point`
  (asymmetric), packed the same way along the output dim.
An act-order layer also has `X.weight_g_idx` (in,), the group of each input column (-1 everywhere: unused).
The dense weight is w = (q - zero_point) * scale, where `weight_scale` is per tensor (one value), per channel
(out, 1), per group (out, in / group_size) or per block (ceil(out / r), ceil(in / c)) for `block_structure`
[r, c] (group size and block structure come from the config group that targets the layer).
Static activation scales (`X.input_scale`) are dropped: weights are read weight-only.
"""

from __future__ import annotations

import re

import torch

from nanovllm.quant.checkpoints.detect import quantization_config
from nanovllm.quant.checkpoints.gptq import group_order
from nanovllm.quant.checkpoints.packing import unpack_int32
from nanovllm.quant.checkpoints.safetensors_folder import SafetensorsFolder
from nanovllm.quant.checkpoints.scales import row_group_scales
from nanovllm.quant.rtn import pack_int4
from nanovllm.quant.weights import QuantizedWeight

PARTS = ("weight_scale", "weight_zero_point", "weight_g_idx")
AUX = (".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx", ".input_scale",
       ".input_zero_point", ".output_scale", ".input_global_scale")


FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "dense", "mixed-precision")


def _config(path, hf_config) -> dict:
    """The quantization_config, checked to name only formats read here."""
    qc = quantization_config(path, hf_config) or {}
    formats = {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()}
    unknown = sorted(str(f) for f in formats - {None, *FORMATS})
    if unknown:
        raise ValueError(f"compressed-tensors format {', '.join(unknown)} is not supported; supported: "
                         f"{', '.join(FORMATS)}")
    return qc


def _targets(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in ("Linear", module) or module.endswith("." + target)


def weight_args(qc: dict, module: str) -> dict:
    """The `weights` quantization arguments of the config group targeting `module` (the first group's if none
    names it)."""
    groups = [g for g in (qc.get("config_groups") or {}).values() if g.get("weights")]
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config group with weight arguments")
    for g in groups:
        if any(_targets(t, module) for t in g.get("targets", ())):
            return g["weights"]
    return groups[0]["weights"]


def _stored(folder: SafetensorsFolder, base: str) -> str | None:
    """How the linear `base` is stored: "packed", "quantized" (fp8/int8 weight with a scale) or None (dense)."""
    if base + ".weight_packed" in folder:
        return "packed"
    if base + ".weight" in folder and base + ".weight_scale" in folder:
        return "quantized"
    return None


def weight_formats(path, hf_config=None) -> dict[str, str]:
    qc = _config(path, hf_config)
    folder = SafetensorsFolder(path)
    out = {}
    for name in folder.names():
        if name.endswith(".weight_packed"):
            bits = int(weight_args(qc, name.removesuffix(".weight_packed")).get("num_bits", 4))
            out[name.removesuffix("_packed")] = "int4" if bits == 4 else "int8"
        elif name.endswith(".weight") and _stored(folder, name.removesuffix(".weight")) == "quantized":
            out[name] = "fp8" if folder.dtype(name).startswith("F8") else "int8"
    return out


def repack(stored: dict[str, torch.Tensor], args: dict, dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """One layer's compressed tensors (keys "weight" or "weight_packed"/"weight_shape", "weight_scale",
    optionally "weight_zero_point" and "weight_g_idx") as a QuantizedWeight."""
    block = args.get("block_structure") if args.get("strategy") == "block" else None
    block = None if block is None else (int(block[0]), int(block[1]))
    zp = stored.get("weight_zero_point")
    if "weight_packed" in stored:
        bits = int(args.get("num_bits", 4))
        if bits not in (4, 8):
            raise ValueError(f"pack-quantized weights of {bits} bits are not supported; supported: 4, 8")
        out, k = (int(d) for d in stored["weight_shape"])
        q = unpack_int32(stored["weight_packed"], bits, dim=1)[:, :k]  # q + 2**(bits - 1), unsigned
        if zp is not None:
            zp = unpack_int32(zp, bits, dim=0)[:out] - (1 << (bits - 1))
        if bits == 8:
            q = q - 128
        fmt = "int4" if bits == 4 else "int8"
    else:
        q = stored["weight"]
        out, k = q.shape
        fmt = {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}.get(q.dtype)
        if fmt is None:
            raise ValueError(f"compressed-tensors weights of dtype {q.dtype} are not supported; supported: "
                             "float8_e4m3fn, int8, and pack-quantized int32")
    scale, group = row_group_scales(stored["weight_scale"], out, k, block, args.get("group_size"))
    offset = None
    if zp is not None:
        zp, _ = row_group_scales(zp, out, k, block, args.get("group_size"))
        if fmt == "int4":  # the unsigned values carry the +8 already: w = (u - 8 - zp) * s
            zp = zp + 8
            offset = None if bool((zp == 8).all()) else -(zp * scale)
        elif bool(zp.any()):
            offset = -(zp * scale)
    perm = None
    g_idx = stored.get("weight_g_idx")
    if g_idx is not None and bool((g_idx >= 0).all()):
        perm = group_order(g_idx, group)
        if perm is not None:
            q = q[:, perm]
    if fmt == "int4":
        q = pack_int4(q.to(torch.uint8))
    elif fmt == "int8":
        q = q.to(torch.int8)
    return QuantizedWeight(fmt, q.contiguous(), scale, group, k, offset, perm, dtype)


def quantized_tensors(path, hf_config=None, dtype: torch.dtype = torch.bfloat16):
    qc = _config(path, hf_config)
    folder = SafetensorsFolder(path)
    for name in folder.names():
        if name.endswith(AUX):
            continue
        base = name.removesuffix(".weight_packed").removesuffix(".weight")
        kind = _stored(folder, base) if name in (base + ".weight", base + ".weight_packed") else None
        if kind is None:
            yield name, folder.get(name)
            continue
        parts = ("weight_packed", "weight_shape") if kind == "packed" else ("weight",)
        stored = {p: folder.get(f"{base}.{p}") for p in (*parts, *PARTS) if f"{base}.{p}" in folder}
        if "weight_scale" not in stored:
            raise ValueError(f"compressed-tensors checkpoint {str(path)!r} lacks {base}.weight_scale")
        yield base + ".weight", repack(stored, weight_args(qc, base), dtype)
