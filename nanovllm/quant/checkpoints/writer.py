"""Quantized checkpoints other engines read (transformers, vLLM): int4 as GPTQ (or compressed-tensors
pack-quantized), fp8 and int8 as compressed-tensors; config.json carries the quantization_config.

The tensors written are exactly the QuantizedWeights given (their integers; scales as the layout stores them:
float16 for GPTQ, float32 for compressed-tensors), so reading the folder back with `quantized_tensors`
gives the same weights whenever the scales are representable in that dtype.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from nanovllm.quant.checkpoints.packing import pack_int32
from nanovllm.quant.weights import QuantizedWeight

LAYOUTS = {"int4": ("gptq", "compressed-tensors"), "int8": ("compressed-tensors",), "fp8": ("compressed-tensors",)}
SHARD_BYTES = 4 << 30


def named_tensors(model_or_tensors) -> Iterable[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(name, value) pairs from a mapping, an iterable of pairs, or a module (a QuantizedWeight submodule
    named X.weight stands for that weight)."""
    if isinstance(model_or_tensors, Mapping):
        return list(model_or_tensors.items())
    if not isinstance(model_or_tensors, nn.Module):
        return list(model_or_tensors)
    quantized = {n: m for n, m in model_or_tensors.named_modules() if isinstance(m, QuantizedWeight)}
    inside = tuple(n + "." for n in quantized)
    dense = [(n, t) for n, t in model_or_tensors.state_dict().items() if not n.startswith(inside)]
    return [*quantized.items(), *dense]


def _integer_zeros(qw: QuantizedWeight) -> torch.Tensor:
    """The zero point z per group (w = (q - z) * scale, q as `values()` gives it) of a weight decoded as
    q * scale + offset: 8 for symmetric int4, 0 for symmetric int8."""
    lo, hi, middle = (0, 15, 8) if qw.format == "int4" else (-128, 127, 0)
    if qw.offset is None:
        return torch.full(qw.scale.shape, middle, dtype=torch.int64)
    scale, offset = qw.scale.float(), qw.offset.float()
    z = torch.round(-offset / scale)
    if (z < lo).any() or (z > hi).any() or not torch.allclose(-z * scale, offset, rtol=1e-3, atol=0):
        raise ValueError(f"this layout stores integer zero points; the weight's offsets are not -z * scale with "
                         f"z in {lo}..{hi}")
    return z.to(torch.int64)


def _unpermuted_values(qw: QuantizedWeight) -> torch.Tensor:
    """q (out, in) as int64 in the original column order (act-order weights store columns permuted)."""
    q = qw.values().to(torch.int64)
    if qw.perm is None:
        return q
    original = torch.empty_like(q)
    original[:, qw.perm] = q
    return original


def _gptq(base: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    out, k = qw.shape
    if out % 8 or k % 8:
        raise ValueError(f"{base}: GPTQ packs 8 values per int32 along both dims; ({out}, {k}) is not a multiple")
    q = _unpermuted_values(qw)
    g_idx = torch.arange(k) // qw.group_size
    if qw.perm is not None:  # stored column j (original column perm[j]) is in group j // group_size
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[qw.perm] = torch.arange(k) // qw.group_size
    zeros = _integer_zeros(qw) - 1  # v1 convention: the stored zero is the zero point minus one
    if (zeros < 0).any():
        raise ValueError(f"{base}: GPTQ's v1 zero points start at 1; this weight has a zero point of 0")
    return {f"{base}.qweight": pack_int32(q.T, 4, dim=0), f"{base}.qzeros": pack_int32(zeros.T, 4, dim=1),
            f"{base}.scales": qw.scale.T.to(torch.float16).contiguous(), f"{base}.g_idx": g_idx.to(torch.int32)}


def _compressed(base: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    if qw.perm is not None:
        raise ValueError(f"{base}: compressed-tensors has no act-order input permutation; write int4 as GPTQ")
    tensors = {f"{base}.weight_scale": qw.scale.float().contiguous()}
    if qw.format == "int4":
        out, k = qw.shape
        tensors[f"{base}.weight_packed"] = pack_int32(qw.values().to(torch.int64), 4, dim=1)  # q + 8, unsigned
        tensors[f"{base}.weight_shape"] = torch.tensor([out, k])
        if qw.offset is not None:
            tensors[f"{base}.weight_zero_point"] = pack_int32(_integer_zeros(qw), 4, dim=0)  # zp + 8
    else:
        tensors[f"{base}.weight"] = qw.qweight
        if qw.offset is not None:
            tensors[f"{base}.weight_zero_point"] = _integer_zeros(qw).to(torch.int8)
    return tensors


def _scheme(qw: QuantizedWeight) -> dict:
    per_channel = qw.group_size >= qw.in_features
    return {"num_bits": 4 if qw.format == "int4" else 8, "type": "float" if qw.format == "fp8" else "int",
            "symmetric": qw.offset is None, "strategy": "channel" if per_channel else "group",
            "group_size": None if per_channel else qw.group_size, "dynamic": False}


def _gptq_config(quantized: dict[str, QuantizedWeight]) -> dict:
    settings = {(q.group_size if q.group_size < q.in_features else -1, q.offset is None, q.perm is not None)
                for q in quantized.values()}
    if len(settings) != 1:
        raise ValueError(f"GPTQ has one group size, symmetry and act-order for the whole model; got {settings}")
    group, sym, act_order = settings.pop()
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": sym,
            "checkpoint_format": "gptq", "lm_head": "lm_head.weight" in quantized}


def _compressed_config(quantized: dict[str, QuantizedWeight], dense_linears: list[str]) -> dict:
    schemes: dict[str, list[str]] = {}
    for name, qw in quantized.items():
        schemes.setdefault(json.dumps(_scheme(qw), sort_keys=True), []).append(name.removesuffix(".weight"))
    formats = {qw.format for qw in quantized.values()}
    layout = "pack-quantized" if formats == {"int4"} else "float-quantized" if formats == {"fp8"} \
        else "int-quantized" if formats == {"int8"} else "mixed-precision"
    groups = {}
    for i, (scheme, modules) in enumerate(schemes.items()):
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(schemes) == 1 else sorted(modules),
                                "weights": json.loads(scheme), "input_activations": None, "output_activations": None}
        if layout == "mixed-precision":
            args = groups[f"group_{i}"]["weights"]
            groups[f"group_{i}"]["format"] = "float-quantized" if args["type"] == "float" else \
                "pack-quantized" if args["num_bits"] == 4 else "int-quantized"
    return {"quant_method": "compressed-tensors", "format": layout, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(n.removesuffix(".weight") for n in dense_linears),
            "kv_cache_scheme": None}


def write_checkpoint(model_or_tensors, out_dir, method: str, config, layout: str | None = None) -> Path:
    """Write the quantized weights and dense tensors of `model_or_tensors` (see named_tensors) as a checkpoint
    folder `out_dir`: `method` "int4" (GPTQ by default, or layout "compressed-tensors"), "int8" or "fp8"
    (compressed-tensors). `config` (a transformers config or a dict) becomes config.json with the
    quantization_config added. Returns out_dir."""
    from safetensors.torch import save_file

    from nanovllm.quant.checkpoints.names import is_linear_weight

    if method not in LAYOUTS:
        raise ValueError(f"unknown quantization method {method!r}; supported: {', '.join(LAYOUTS)}")
    layout = layout or LAYOUTS[method][0]
    if layout not in LAYOUTS[method]:
        raise ValueError(f"{method} checkpoints are written as {' or '.join(LAYOUTS[method])}, not {layout!r}")
    items = named_tensors(model_or_tensors)
    quantized = {n: v for n, v in items if isinstance(v, QuantizedWeight)}
    wrong = sorted({v.format for v in quantized.values()} - {method})
    if not quantized or wrong:
        raise ValueError(f"write_checkpoint(method={method!r}) needs {method} QuantizedWeights; "
                         + (f"got {', '.join(wrong)} ones" if wrong else "got none"))
    tensors: dict[str, torch.Tensor] = {}
    for name, value in items:
        if isinstance(value, QuantizedWeight):
            base = name.removesuffix(".weight")
            tensors.update(_gptq(base, value) if layout == "gptq" else _compressed(base, value))
        else:
            tensors[name] = value.detach().contiguous()
    dense_linears = [n for n, v in items if not isinstance(v, QuantizedWeight) and is_linear_weight(n)]
    qc = _gptq_config(quantized) if layout == "gptq" else _compressed_config(quantized, dense_linears)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_shards(tensors, out, save_file)
    data = dict(config) if isinstance(config, Mapping) else config.to_dict()
    data["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return out


def _save_shards(tensors: dict[str, torch.Tensor], out: Path, save_file) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards of at most SHARD_BYTES with their index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
