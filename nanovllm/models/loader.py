"""Loads a local Hugging Face folder: config.json and safetensors weights (one file or sharded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nanovllm.quant.pack import dense_weight, pack_rows
from nanovllm.quant.weights import is_quantized


def load_hf_config(path: Path):
    from transformers import AutoConfig

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model folder {str(path)!r} has no config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed config.json in {str(path)!r}: {e}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"malformed config.json in {str(path)!r}: it needs a JSON object with a 'model_type'")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ValueError(f"config.json in {str(path)!r} could not be read: {e}") from None
    return text_only(config)


# multimodal architecture -> the text model its language weights load into
TEXT_ONLY = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}


def text_only(config):
    """The text config of a multimodal checkpoint whose language model we run (vision weights are skipped)."""
    archs = [TEXT_ONLY[a] for a in getattr(config, "architectures", None) or [] if a in TEXT_ONLY]
    if not archs:
        return config
    text = config.get_text_config()
    text.architectures = archs
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text, key, None) is None and getattr(config, key, None) is not None:
            setattr(text, key, getattr(config, key))
    return text


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"malformed {index}: {e}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {str(path)!r} has no *.safetensors weights")
    return files


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"truncated or corrupt safetensors file {str(f)!r}: {e}") from None


def count_tensors(files: list[Path]) -> int:
    """Reads only the headers, so a damaged file is reported before any weight is loaded."""
    total = 0
    for f in files:
        with _open(f) as sf:
            total += len(list(sf.keys()))
    return total


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        with _open(f) as sf:
            for name in sf.keys():
                try:
                    yield name, sf.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise ValueError(f"truncated or corrupt safetensors file {str(f)!r} ({name}): {e}") from None


def load_weights(model: torch.nn.Module, tensors, dtype: torch.dtype, progress=None, quantize=None,
                 transform=None) -> None:
    """Copy HF tensors into the model's parameters, packing shards; every parameter must be filled. KV cache
    scales are no weights: the engine reads them for an fp8 cache (nanovllm/engine/kv_scales.py).

    The model's quantized weights (`model.quantized`, parameter name -> format; placeholders until now) are
    installed as QuantizedWeights: a checkpoint's own (tensors that are QuantizedWeight), or each dense tensor
    quantized as it arrives by `quantize(param_name, tensor) -> QuantizedWeight` on the model's device, so no
    dense copy of a quantized matrix stays behind. The shards of a packed weight are joined once all came.
    A QuantizedWeight for a weight the model keeps dense is dequantized into it. `transform(param_name, shard,
    tensor) -> tensor` rewrites each dense tensor first (activation-aware scales folded in, quant/awq.py)."""
    from nanovllm.engine.kv_scales import is_kv_scale

    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = dict(getattr(model, "quantized", {}))
    device = next((p.device for p in params.values() if p.device.type != "meta"), torch.device("cpu"))
    pending: dict[str, dict] = {}  # quantized parameter -> {shard: QuantizedWeight} until every shard came
    filled: dict[str, set] = {}
    tied_head = getattr(model.args, "tie_word_embeddings", False) and "lm_head" in quantized

    def prepare(hf_name: str, name: str, shard, tensor: torch.Tensor) -> torch.Tensor:
        tensor = model.convert_tensor(hf_name, tensor)
        return tensor if transform is None else transform(name, shard, tensor)

    def add_quantized(name: str, shard, hf_name: str, tensor) -> None:
        expected = model.shard_view(name, shard, params[name].data).shape
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected)}")
        if is_quantized(tensor):
            part = tensor.to(device)
            part.dtype = dtype
        elif quantize is None:
            raise ValueError(f"{name} is {quantized[name]} but checkpoint tensor {hf_name!r} is dense and no "
                             "quantization is set")
        else:
            part = quantize(name, prepare(hf_name, name, shard, tensor.to(device)).to(dtype))
        shards = pending.setdefault(name, {})
        shards[shard] = part
        if len(shards) == model.num_shards(name):
            model.install_weight(name, pack_rows([shards[k] for k in sorted(shards, key=lambda k: k or 0)]))
            del pending[name]

    for hf_name, tensor in tensors:
        target = model.param_name(hf_name)
        if target is None:
            if hf_name.endswith("rotary_emb.inv_freq") or is_kv_scale(hf_name) or model.skips(hf_name):
                continue
            raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(model).__name__}")
        name, shard = target
        if name in quantized:
            add_quantized(name, shard, hf_name, tensor)
        else:
            if is_quantized(tensor):
                tensor = dense_weight(tensor, dtype)
            dest = model.shard_view(name, shard, params[name].data)
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(prepare(hf_name, name, shard, tensor).to(dtype))
            if name == "embed" and tied_head:  # a quantized head tied to the embeddings: quantize a copy
                add_quantized("lm_head", None, hf_name, tensor)
                filled.setdefault("lm_head", set()).add(None)
        filled.setdefault(name, set()).add(shard)
        if progress:
            progress()
    if getattr(model.args, "tie_word_embeddings", False):
        filled.setdefault("lm_head", {None})
    missing = [n for n in params if n not in filled or
               (None not in filled[n] and len(filled[n]) < model.num_shards(n))]
    if missing:
        raise ValueError(f"checkpoint lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
