"""Where a model's weights come from and in which formats: a dense checkpoint as it is, a dense checkpoint
quantized on load (`quantization=fp8|int8|int4`), or a pre-quantized checkpoint read through
nanovllm.quant.checkpoints (detect / weight_formats / quantized_tensors).

The model runner asks for the source before it builds the model: `formats` (parameter name -> format) is what
the op resolver resolves each layer for and where the model puts placeholders; `tensors()` and `quantize` are
what loading consumes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanovllm.quant.plan import QuantSpec, checkpoint_formats
from nanovllm.quant.weights import QuantizedWeight


@dataclass
class WeightSource:
    formats: dict[str, str]                          # quantized parameter name -> format; the rest are dense
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor | QuantizedWeight]]]
    count: Callable[[], int | None]                  # how many tensors `tensors()` yields (None: unknown)
    quantize: Callable[[str, torch.Tensor], QuantizedWeight] | None = None  # dynamic quantization of one tensor
    transform: Callable | None = None                # rewrites each dense tensor first (awq.Calibration.transform)
    description: str = "none"                        # "int4 (group 128, symmetric)", "gptq checkpoint", "none"
    spec: QuantSpec | None = field(default=None)


def quant_spec(config, num_layers: int) -> QuantSpec | None:
    """The dynamic quantization an EngineConfig asks for, or None (dense weights)."""
    if config.quantization is None:
        return None
    from nanovllm.ops.resolver import parse_layers

    skip = (parse_layers(config.quantization_skip, num_layers, key="quantization_skip")
            if config.quantization_skip else frozenset())
    return QuantSpec(config.quantization, config.quantization_group_size, config.quantization_symmetric, skip,
                     config.quantization_lm_head, config.quantization_calibrate)


def checkpoint_readers():
    """The readers of pre-quantized checkpoints (nanovllm.quant.checkpoints: detect, weight_formats, ...)."""
    from nanovllm.quant import checkpoints

    return checkpoints


def weight_source(model_path: Path, hf_config, config, readers=None) -> WeightSource:
    """The weights of the checkpoint at `model_path` for EngineConfig `config`. `readers`: the checkpoint
    readers module (default: nanovllm.quant.checkpoints; tests pass a fake one)."""
    from nanovllm.models.loader import count_tensors, iter_tensors, weight_files

    readers = readers if readers is not None else checkpoint_readers()
    method = readers.detect(model_path, hf_config)
    if method == "gguf" and config.quantization is not None and model_path.is_dir() and any(
            model_path.glob("*.safetensors")):
        method = None  # a converted GGUF folder also holds the dequantized weights: those are quantized as asked
    if method is not None:
        if config.quantization is not None:
            raise ValueError(f"the checkpoint at {str(model_path)!r} is already quantized ({method}); "
                             f"leave quantization unset (got quantization={config.quantization!r})")
        formats = checkpoint_formats(readers.weight_formats(model_path, hf_config))

        def count() -> int | None:
            try:
                return count_tensors(weight_files(model_path))
            except (FileNotFoundError, ValueError):
                return None

        return WeightSource(formats, lambda: readers.quantized_tensors(model_path, hf_config), count,
                            description=f"{method} checkpoint")
    files = weight_files(model_path)
    spec = quant_spec(config, hf_config.num_hidden_layers)
    dense = dict(tensors=lambda: iter_tensors(files), count=lambda: count_tensors(files))
    if spec is None:
        return WeightSource({}, **dense)
    formats = spec.weight_formats(hf_config.num_hidden_layers)
    if spec.calibrate:
        from nanovllm.quant.awq import calibrate

        calibration = calibrate(model_path, hf_config, spec)
        return WeightSource(formats, quantize=calibration.quantizer(spec), transform=calibration.transform,
                            description=spec.describe(), spec=spec, **dense)
    return WeightSource(formats, quantize=quantizer(spec), description=spec.describe(), spec=spec, **dense)


def quantizer(spec: QuantSpec) -> Callable[[str, torch.Tensor], QuantizedWeight]:
    """Round-to-nearest quantization of one dense weight, as `spec` says (quant/rtn.py)."""
    from nanovllm.quant.rtn import quantize

    def quantize_weight(name: str, weight: torch.Tensor) -> QuantizedWeight:
        return quantize(weight, spec.method, spec.weight_group_size, spec.symmetric)

    return quantize_weight
