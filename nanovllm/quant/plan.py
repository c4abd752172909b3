"""Which of a model's linear weights are quantized, and to what format, decided before the model is built.

The map is keyed by the model's parameter names ("layers.3.qkv_proj", "lm_head"); weights it does not name
stay dense (embeddings, norms, the MoE router and experts). It comes either from dynamic quantization
settings (`QuantSpec`: every layer's linear weights but the skipped ones) or from a pre-quantized checkpoint's
own formats (`checkpoint_formats`). The op resolver resolves each layer for its weights' formats from it, and
the model holds placeholders for the quantized weights that loading fills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nanovllm.quant.pack import packed_format
from nanovllm.quant.weights import FORMATS

LAYER_WEIGHTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # a decoder layer's quantizable weights
LM_HEAD = "lm_head"
GROUP_SIZES = (32, 64, 128)  # int4 group sizes
# quantization_calibrate: what fits the weights to calibration activations before or while they round
CALIBRATIONS = ("awq", "gptq", "awq+gptq")
DEFAULT_CALIBRATION = {"fp8": "awq", "int8": "awq", "int4": "awq+gptq"}  # what `true` means per format

# a layer's linear weight in a Hugging Face checkpoint (any prefix: "model.", "model.language_model." ...)
_HF_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
_HF_PACKED = {"q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "o": "o_proj", "gate": "gate_up_proj",
              "up": "gate_up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class QuantSpec:
    """Dynamic quantization on load: round-to-nearest `method` weights (fp8 and int8 per output channel, int4
    in groups of `group_size`, symmetric or with a zero point), except in the `skip` layers (and lm_head unless
    `lm_head`); `calibrate`: "awq" (activation-aware input-channel scales and clipping before rounding,
    quant/awq.py), "gptq" (error-compensating rounding, quant/gptq.py), "awq+gptq" (both: GPTQ rounds the scaled
    weight), True (DEFAULT_CALIBRATION of the format) or False / "" (round to nearest)."""

    method: str
    group_size: int = 128
    symmetric: bool = True
    skip: frozenset[int] = frozenset()
    lm_head: bool = False
    calibrate: bool | str = False

    def __post_init__(self):
        object.__setattr__(self, "calibrate", calibration_method(self.calibrate, self.method))
        if self.method not in FORMATS:
            raise ValueError(f"quantization={self.method!r} is not one of {', '.join(FORMATS)} (or None: dense)")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantization_group_size={self.group_size!r}: int4 groups are one of {GROUP_SIZES}")
        if not self.symmetric and self.method != "int4":
            raise ValueError(f"quantization_symmetric=false (a zero point) is int4 only, not {self.method}")

    @property
    def awq(self) -> bool:
        return "awq" in self.calibrate.split("+")

    @property
    def gptq(self) -> bool:
        return "gptq" in self.calibrate.split("+")

    @property
    def weight_group_size(self) -> int | None:
        """The group size the quantizer gets: int4's groups; None (one per output channel) for fp8 and int8."""
        return self.group_size if self.method == "int4" else None

    def describe(self) -> str:
        """"int4 (group 128, symmetric)", "fp8 (per channel)", with the skipped layers and lm_head."""
        how = (f"group {self.group_size}, {'symmetric' if self.symmetric else 'zero point'}"
               if self.method == "int4" else "per channel")
        extra = ((", activation-aware scales" if self.awq else "") + (", GPTQ rounding" if self.gptq else "")
                 + (", lm_head too" if self.lm_head else ""))
        skip = f", layers {','.join(map(str, sorted(self.skip)))} dense" if self.skip else ""
        return f"{self.method} ({how}{extra}{skip})"

    def weight_formats(self, num_layers: int) -> dict[str, str]:
        """Parameter name -> format for every weight this spec quantizes."""
        out = {f"layers.{i}.{w}": self.method for i in range(num_layers) if i not in self.skip for w in LAYER_WEIGHTS}
        if self.lm_head:
            out[LM_HEAD] = self.method
        return out


def param_name(hf_name: str) -> str | None:
    """Our parameter name of a Hugging Face checkpoint's layer linear weight ("model.layers.3.self_attn.k_proj.weight"
    -> "layers.3.qkv_proj"), or None for any other tensor."""
    m = _HF_LINEAR.search(hf_name)
    return f"layers.{m[1]}.{_HF_PACKED[m[2]]}" if m else None


def calibration_method(value: bool | str | None, fmt: str | None) -> str:
    """quantization_calibrate as one of CALIBRATIONS, or "" (round to nearest): True is the format's default."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false", "none", "rtn")):
        return ""
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return DEFAULT_CALIBRATION.get(fmt, "awq")
    method = value.lower().replace(",", "+") if isinstance(value, str) else value
    if method == "gptq+awq":
        method = "awq+gptq"
    if method not in CALIBRATIONS:
        raise ValueError(f"quantization_calibrate={value!r} is not one of {', '.join(CALIBRATIONS)}, true (the "
                         f"format's default) or false (round to nearest)")
    return method


def checkpoint_formats(hf_formats: dict[str, str]) -> dict[str, str]:
    """A pre-quantized checkpoint's formats (Hugging Face weight name -> format) by our parameter names. The
    shards of a packed weight that differ (int4 q/k beside an int8 v) pack into the widest format; weights we
    keep dense (MoE experts, embeddings) are left out, so loading dequantizes them."""
    shards: dict[str, set[str]] = {}
    for hf_name, fmt in hf_formats.items():
        if fmt not in FORMATS:
            raise ValueError(f"checkpoint weight {hf_name!r} has unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        if name := param_name(hf_name):
            shards.setdefault(name, set()).add(fmt)
        elif hf_name.endswith("lm_head.weight"):
            shards.setdefault(LM_HEAD, set()).add(fmt)
    return {name: packed_format(formats) for name, formats in shards.items()}
