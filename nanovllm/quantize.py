"""python -m nanovllm.quantize MODEL OUT --method int4|int8|fp8 [--group-size N] [--calibrate [gptq]] [--layout L]

Loads the dense checkpoint MODEL (any name nanovllm resolves: a folder, a catalog name, a repo id, a GGUF
file, whose dequantized weights are requantized),
quantizes every linear weight (attention and MLP projections and experts; embeddings, norms, the router and
lm_head stay dense), and writes OUT: int4 as a GPTQ checkpoint (or `--layout compressed-tensors`), int8 and
fp8 as compressed-tensors, with config.json's quantization_config and the tokenizer files, so the cost is paid
once and transformers, vLLM and nanovllm read the result.

The quantizer is `quantize_weight`: round-to-nearest (nanovllm.quant.rtn) by default; with --calibrate,
`calibrated_quantizer`: GPTQ rounding (nanovllm.quant.gptq) fitted to the shipped calibration text, a function
of the same signature. AWQ-style scales are not offered here: they fold into the RMSNorm weights and up rows,
which the writer copies as they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from nanovllm.quant.weights import QuantizedWeight

DEFAULT_GROUP = {"int4": 128, "int8": None, "fp8": None}  # None: per output channel
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")

Quantizer = Callable[[str, torch.Tensor], QuantizedWeight]


def quantize_weight(method: str, group_size: int | None, scale_dtype: torch.dtype) -> Quantizer:
    """Round-to-nearest, symmetric: (name, dense weight) -> QuantizedWeight (a layer narrower than the group
    size is quantized per channel)."""
    from nanovllm.quant.rtn import quantize

    def quantizer(name: str, w: torch.Tensor) -> QuantizedWeight:
        group = group_size if group_size is not None and group_size < w.shape[1] else None
        return quantize(w, method, group, scale_dtype=scale_dtype)

    return quantizer


def calibrated_quantizer(folder: Path, method: str, group_size: int | None, scale_dtype: torch.dtype,
                         calibration: str = "gptq") -> Quantizer:
    """GPTQ rounding of every layer linear weight, with Hessians from the dense model at `folder` run over the
    calibration text; other weights (MoE experts) round to nearest."""
    from nanovllm.models.loader import load_hf_config
    from nanovllm.quant import gptq
    from nanovllm.quant.awq import calibrate
    from nanovllm.quant.plan import QuantSpec, param_name

    if calibration != "gptq":
        raise ValueError(f"--calibrate {calibration}: the writer offers gptq only (AWQ scales fold into the norms, "
                         f"which it writes unchanged)")
    spec = QuantSpec(method, group_size or DEFAULT_GROUP["int4"], calibrate="gptq")
    calibration = calibrate(folder, load_hf_config(folder), spec)
    nearest = quantize_weight(method, group_size, scale_dtype)

    def quantizer(name: str, w: torch.Tensor) -> QuantizedWeight:
        h = calibration.hessian(param_name(name) or "", w.device)
        if h is None:
            return nearest(name, w)
        group = group_size if group_size is not None and group_size < w.shape[1] else None
        return gptq.quantize(w, h, method, group, scale_dtype=scale_dtype, clip_search=True)

    return quantizer


def should_quantize(name: str, w: torch.Tensor) -> bool:
    from nanovllm.quant.checkpoints.names import is_linear_weight

    return is_linear_weight(name) and name != "lm_head.weight" and w.dim() == 2


def quantize_folder(folder: Path, out: Path, method: str, group_size: int | None = None,
                    calibrate: bool | str = False, layout: str | None = None) -> Path:
    """Quantize the dense Hugging Face folder `folder` into the checkpoint folder `out`; `calibrate`: "gptq"
    (or True) for GPTQ rounding, False for round to nearest."""
    from nanovllm.quant.checkpoints import detect
    from nanovllm.quant.checkpoints.safetensors_folder import SafetensorsFolder
    from nanovllm.quant.checkpoints.writer import LAYOUTS, write_checkpoint

    if method not in LAYOUTS:
        raise ValueError(f"unknown quantization method {method!r}; supported: {', '.join(LAYOUTS)}")
    method_on_disk = detect(folder)
    if method_on_disk not in (None, "gguf"):  # a converted GGUF folder also holds its dequantized weights
        raise ValueError(f"{str(folder)!r} is already quantized ({method_on_disk}); quantize a dense checkpoint")
    group = group_size if group_size is not None else DEFAULT_GROUP[method]
    layout = layout or LAYOUTS[method][0]
    # GPTQ stores float16 scales: quantize with float16 scales so the file holds exactly these weights
    scale_dtype = torch.float16 if layout == "gptq" else torch.float32
    quantizer = (calibrated_quantizer(folder, method, group, scale_dtype, "gptq" if calibrate is True else calibrate)
                 if calibrate else quantize_weight(method, group, scale_dtype))
    tensors = SafetensorsFolder(folder)
    weights = {}
    for name in tensors.names():
        w = tensors.get(name)
        weights[name] = quantizer(name, w) if should_quantize(name, w) else w
    config = json.loads((folder / "config.json").read_text())
    write_checkpoint(weights, out, method, config, layout)
    for f in folder.iterdir():  # tokenizer, generation config, chat template, ...
        if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_FILES):
            shutil.copy(f, out / f.name)
    return out


def main(argv: list[str] | None = None) -> None:
    from nanovllm.checkpoints import resolve_model

    parser = argparse.ArgumentParser(prog="python -m nanovllm.quantize", description=__doc__.split("\n\n")[1])
    parser.add_argument("model", help="a dense checkpoint: folder, catalog name or Hugging Face repo id")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--method", required=True, choices=sorted(DEFAULT_GROUP))
    parser.add_argument("--group-size", type=int, default=None,
                        help="inputs per scale (default: 128 for int4, per output channel for int8 and fp8)")
    parser.add_argument("--calibrate", nargs="?", const="gptq", default=False, choices=("gptq",),
                        help="GPTQ rounding fitted to the shipped calibration text instead of round to nearest")
    parser.add_argument("--layout", choices=("gptq", "compressed-tensors"), default=None,
                        help="int4's checkpoint layout (default gptq); int8 and fp8 are compressed-tensors")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hugging Face repo id")
    args = parser.parse_args(argv)
    folder = resolve_model(args.model, revision=args.revision)
    out = quantize_folder(folder, args.out, args.method, args.group_size, args.calibrate, args.layout)
    print(f"wrote {args.method} checkpoint {out}")


if __name__ == "__main__":
    main()
