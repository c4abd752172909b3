"""Activation-aware weight quantization (AWQ-style): per-input-channel scales from the activations a layer
meets on a short calibration text (calibration.txt), chosen so that rounding hurts the channels that carry
large activations less.

For y = x @ W.T, any s > 0 gives y = (x / s) @ (W * s).T; quantizing W * s instead of W spends the grid on
the columns that matter. s = mean|x| ** alpha, alpha searched per weight for the least output error. The
division of x by s is folded into what produces x, so no kernel sees it:
- qkv_proj: into the input RMSNorm's weight; gate_up_proj: into the pre-MLP RMSNorm's weight;
- down_proj: into the up projection's rows (act(gate) * up / s = act(gate) * (up / s)).
o_proj's input comes out of attention, where no fold is exact under grouped KV heads: it keeps s = 1. Every
weight then rounds with a clip search weighted by its input's mean square (rtn.quantize's `importance`).

The statistics come from a dense model, built on the CPU in float32 from the same checkpoint and run once
over the calibration text: the device never holds a dense copy of a weight that is quantized. With GPTQ the
pass is sequential (as GPTQ's authors calibrate): each weight is quantized the moment its inputs are taken and
the rest of the pass runs with it, so every weight is fitted to the inputs it meets in the quantized model,
the errors of the weights before it (in its own layer too) included. It rounds again as it loads, from the
same Hessian: the pass's rounding cannot stand in for that one, because the up rows of gate_up_proj load
divided by down_proj's scale, which is searched only after gate_up_proj has been rounded in the pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from nanovllm.quant import gptq
from nanovllm.quant.plan import LAYER_WEIGHTS, QuantSpec
from nanovllm.quant.rtn import quantize

CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")
ALPHAS = tuple(i / 10 for i in range(11))
MAX_TOKENS = 2048    # calibration tokens: GPTQ's Hessians need more tokens than a layer has inputs
AWQ_TOKENS = 512     # of which the scale search and the importance take the first
SEQUENCE_TOKENS = 2048  # the calibration tokens run as sequences of at most this many
SAMPLE_ROWS = 256    # input rows the alpha search measures the output error on
SEQUENTIAL = True    # with GPTQ: fit each weight to the inputs the already quantized weights before it produce
FOLDS = {"qkv_proj": "input_norm", "gate_up_proj": "post_norm"}  # weight -> the norm its input comes out of


@dataclass
class Calibration:
    """scales[param]: the s each weight's columns are multiplied by (and its input divided by);
    importance[param]: the mean square of each input column, after the division; for the weights GPTQ rounds
    (quant/gptq.py), hessians[param]: 2 X^T X / n of its inputs X after the division, or where X is the smaller
    (fewer tokens than inputs), gptq_inputs[param]: X itself (`hessian` gives either as H)."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    gptq_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def hessian(self, name: str, device) -> torch.Tensor | None:
        """GPTQ's H of weight `name` on `device`, or None where GPTQ does not round it."""
        if (h := self.hessians.get(name)) is not None:
            return h.to(device)
        x = self.gptq_inputs.get(name)
        return None if x is None else gptq.hessian(x.to(device))

    def transform(self, name: str, shard, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor with the scales folded in (called for every tensor as it loads)."""
        layer, _, param = name.rpartition(".")
        for weight, norm in FOLDS.items():
            if param == norm and (s := self.scales.get(f"{layer}.{weight}")) is not None:
                return tensor / s.to(tensor)
        if (s := self.scales.get(name)) is not None:
            tensor = tensor * s.to(tensor)
        if param == "gate_up_proj" and shard == 1 and (s := self.scales.get(f"{layer}.down_proj")) is not None:
            tensor = tensor / s.to(tensor)[:, None]  # the up rows: down's input is divided by s
        return tensor

    def quantizer(self, spec: QuantSpec):
        def quantize_weight(name: str, weight: torch.Tensor):
            if (h := self.hessian(name, weight.device)) is not None:
                return gptq.quantize(weight, h, spec.method, spec.weight_group_size, spec.symmetric,
                                     clip_search=True)
            importance = self.importance.get(name)
            return quantize(weight, spec.method, spec.weight_group_size, spec.symmetric, clip_search=True,
                            importance=None if importance is None else importance.to(weight.device))

        return quantize_weight


def calibration_ids(model_path: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    return tokenizer(CALIBRATION_TEXT.read_text()).input_ids[:MAX_TOKENS]


def dense_cpu_model(model_path: Path, hf_config):
    """The dense model in float32 on the CPU, every op native, loaded from the checkpoint."""
    from nanovllm.models.loader import iter_tensors, load_weights, weight_files
    from nanovllm.models.registry import build_model, model_target
    from nanovllm.ops import OpResolver

    resolver = OpResolver({"default": "eager"}, model_target(hf_config, "cpu", torch.float32),
                          hf_config.num_hidden_layers)
    with torch.device("cpu"):
        model = build_model(hf_config, resolver)
    model.float()
    load_weights(model, iter_tensors(weight_files(model_path)), torch.float32)
    return model


def run_weights(model, ids: list[int], visit) -> None:
    """One pass of a dense CPU model (whose layers this rewires for the purpose: use it for nothing else) over
    `ids`, as sequences of at most SEQUENCE_TOKENS, calling visit(name, x) as each layer linear weight meets
    its input x (tokens, in), in the order the forward pass reaches them; a tensor visit returns replaces that
    weight in this product and in the rest of the pass."""
    from nanovllm.models.dense import layer_ops
    from nanovllm.ops.meta import build_metadata

    names: dict[int, str] = {}

    def visiting_linear(x, weight, bias=None):
        if id(weight) in names:
            replaced = visit(names[id(weight)], x.detach().reshape(-1, x.shape[-1]).float())
            if replaced is not None:
                weight = replaced.to(weight)
        return torch.nn.functional.linear(x, weight, bias)

    block, a = 16, model.args
    lens = [min(SEQUENCE_TOKENS, len(ids) - i) for i in range(0, len(ids), SEQUENCE_TOKENS)]
    tables, blocks = [], 0
    for n in lens:
        tables.append(list(range(blocks, blocks + -(-n // block))))
        blocks += len(tables[-1])
    for layer in model.layers:
        names.update({id(w): f"layers.{layer.idx}.{n}" for n, w in quantizable(layer).items()})
        layer.ops = SimpleNamespace(**{op: _native(op, visiting_linear) for op in layer_ops(a, layer.idx)})
        if not layer.moe:
            layer.mlp = layer.ops.gelu_mlp if a.activation == "gelu_tanh" else layer.ops.mlp
        layer.decode_weights = None
        shape = (blocks + 1, block, a.num_kv_heads, a.head_dim)
        layer.k_cache, layer.v_cache = torch.zeros(shape), torch.zeros(shape)
    meta = build_metadata(tables, lens, block, q_lens=lens).to_device("cpu")
    with torch.inference_mode():
        model(torch.tensor(ids), meta.positions, meta)


def quantizable(layer) -> dict[str, torch.Tensor]:
    return {n: getattr(layer, n) for n in LAYER_WEIGHTS if getattr(layer, n, None) is not None}


def _native(op: str, linear):
    """The op's native composition with `linear` as its linear part, at every depth."""
    from nanovllm.ops import get_op

    if op == "linear":
        return linear
    opdef = get_op(op)
    if not opdef.is_site:
        return opdef.native
    return functools.partial(opdef.native, **{p: _native(p, linear) for p in opdef.parts})


def search_scale(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """s = mean|x| ** alpha (normalised around 1) for the alpha whose quantized W * s gives the output closest
    to x @ W.T on a sample of rows."""
    rows = x[torch.linspace(0, len(x) - 1, min(SAMPLE_ROWS, len(x))).long()]
    ref = rows @ w.T
    magnitude = x.abs().mean(0).clamp_min(1e-6)
    best, best_err = torch.ones_like(magnitude), float("inf")
    for alpha in ALPHAS:
        s = magnitude ** alpha
        s = s / (s.max() * s.min()).sqrt()
        q = quantize(w * s, spec.method, spec.weight_group_size, spec.symmetric).dequantize(torch.float32)
        err = ((rows / s) @ q.T - ref).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


def calibrate(model_path: Path, hf_config, spec: QuantSpec, ids: list[int] | None = None,
              sequential: bool = SEQUENTIAL) -> Calibration:
    """Scales (spec.awq), input importance and GPTQ's Hessians (spec.gptq) for every weight `spec` quantizes,
    from the checkpoint at `model_path` run over `ids` (default: the calibration text). sequential: each weight
    is quantized as soon as its statistics are taken, and the rest of the pass runs with the quantized weight,
    so every later weight is fitted to the inputs it meets in the quantized model (within a layer too: the
    o projection's inputs come from the quantized qkv projection); otherwise all from the dense model. Only
    with GPTQ: AWQ alone takes its statistics from the dense model."""
    model = dense_cpu_model(model_path, hf_config)
    weights = {f"layers.{layer.idx}.{n}": w.data for layer in model.layers for n, w in quantizable(layer).items()}
    formats = spec.weight_formats(hf_config.num_hidden_layers)
    out = Calibration()
    quantize_weight = out.quantizer(spec)
    ids = ids if ids is not None else calibration_ids(model_path)
    sequential = sequential and spec.gptq

    def fit(name: str, x: torch.Tensor) -> torch.Tensor | None:
        if name not in formats:
            return None
        w = weights[name]
        s = None
        if spec.awq and name.rpartition(".")[2] in (*FOLDS, "down_proj"):
            out.scales[name] = s = search_scale(x[:AWQ_TOKENS], w, spec)
            x, w = x / s, w * s
        out.importance[name] = x[:AWQ_TOKENS].pow(2).mean(0)
        if spec.gptq and len(x) < x.shape[1]:
            out.gptq_inputs[name] = x
        elif spec.gptq:
            out.hessians[name] = gptq.hessian(x)
        if not sequential:
            return None
        q = quantize_weight(name, w).dequantize(torch.float32)  # (x / s) @ q.T = x @ (q / s).T
        return q if s is None else q / s

    run_weights(model, ids, fit)
    return out
