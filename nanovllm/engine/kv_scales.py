"""The per-head scales of an fp8 KV cache (kv_cache_dtype=fp8), chosen once at load, in this order:

1. The checkpoint's: vLLM's names `model.layers.N.self_attn.k_scale` / `v_scale` (or the older
   `k_proj.output_scale` / `v_proj.output_scale`), one per layer (a scalar, used for every KV head) or one per
   KV head, as FP8 checkpoints with a quantized KV cache ship them. Used when every layer has both.
2. Else calibrated: one prefill of a calibration text (nanovllm/assets/kv_calibration.txt, tokenized by the
   model's tokenizer; token ids spread over the vocabulary when the model has none) over a temporary cache in
   the model dtype. Each head's scale maps CALIBRATION_HEADROOM times the largest |K| (|V|) the calibration
   wrote to fp8's largest value (nanovllm/ops/kv_quant.py), so longer texts' somewhat larger values still fit.
3. A head the calibration never saw a nonzero value in gets scale 1.0.

Scales are float32 tensors (2, kv_heads) per layer, row 0 for K, row 1 for V; they never change after load, so
blocks shared through the prefix cache always decode the same and CUDA graphs capture them as constants.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from nanovllm.ops import kv_quant

log = logging.getLogger("nanovllm")

# a KV scale tensor's name: its layer index and whether it scales K or V
_SCALE_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(?:([kv])_scale|([kv])_proj\.output_scale)$")
CALIBRATION_TOKENS = 512  # at most this many tokens of the calibration text (fewer when max_model_len is shorter)


def is_kv_scale(hf_name: str) -> bool:
    """A checkpoint tensor that holds a KV cache scale (read here, not loaded as a weight)."""
    return _SCALE_NAME.search(hf_name) is not None


def checkpoint_scales(files: list[Path], num_layers: int, kv_heads: int) -> list[torch.Tensor] | None:
    """Per-layer (2, kv_heads) float32 scales from the checkpoint, or None unless every layer has K and V."""
    from safetensors import safe_open

    found: dict[tuple[int, int], torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():
                if m := _SCALE_NAME.search(name):
                    value = sf.get_tensor(name).float().flatten()
                    if value.numel() not in (1, kv_heads):
                        raise ValueError(f"checkpoint tensor {name!r} has {value.numel()} values; a KV cache scale "
                                         f"has 1 or one per KV head ({kv_heads})")
                    if not torch.isfinite(value).all() or (value <= 0).any():
                        raise ValueError(f"checkpoint tensor {name!r} holds a scale that is not a positive number")
                    found[int(m[1]), 0 if (m[2] or m[3]) == "k" else 1] = value.expand(kv_heads)
    if not found:
        return None
    missing = [i for i in range(num_layers) if (i, 0) not in found or (i, 1) not in found]
    if missing:
        log.warning("the checkpoint has KV cache scales for some layers only (none for layers %s); calibrating "
                    "all of them instead", missing[:8])
        return None
    return [torch.stack([found[i, 0], found[i, 1]]) for i in range(num_layers)]


def calibration_ids(model_path: Path, vocab_size: int, max_tokens: int) -> list[int]:
    """Token ids of the calibration text, at most max_tokens of them."""
    text = resources.files("nanovllm.assets").joinpath("kv_calibration.txt").read_text(encoding="utf-8")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
        ids = [i for i in tokenizer(text)["input_ids"] if i < vocab_size]
    except (OSError, ValueError) as e:  # no tokenizer files: ids spread over the vocabulary
        log.info("no tokenizer to calibrate the KV cache scales with (%s); using spread token ids", e)
        ids = np.random.default_rng(0).integers(0, vocab_size, max_tokens).tolist()
    return ids[:max_tokens]


@torch.inference_mode()
def calibrate(runner, token_ids: list[int]) -> list[torch.Tensor]:
    """One prefill of token_ids over a temporary model-dtype cache; the per-head amax of the K and V it wrote,
    as scales. Leaves the runner without a cache."""
    from nanovllm.engine.scheduler import ScheduledSeq
    from nanovllm.engine.sequence import Sequence
    from nanovllm.sampling_params import SamplingParams

    a, bs = runner.args, runner.block_size
    blocks = -(-len(token_ids) // bs)
    shape = (blocks + 1, bs, a.num_kv_heads, a.head_dim)  # + the scratch block padded slots write to
    for layer in runner.model.layers:
        layer.k_cache = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        layer.v_cache = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        layer.kv_scales = None
    seq = Sequence(list(token_ids), SamplingParams(temperature=1.0))
    seq.block_table = list(range(blocks))
    input_ids, positions, meta, _ = runner.prepare([ScheduledSeq(seq, len(token_ids))])
    runner.model(input_ids, positions, meta)  # the eager model: a compiled forward would trace a throwaway cache
    scales = []
    for layer in runner.model.layers:
        amax = [c[:blocks].abs().amax(dim=(0, 1, 3)).float() for c in (layer.k_cache, layer.v_cache)]
        scales.append(kv_quant.scales_from_amax(torch.stack(amax)))
        layer.k_cache = layer.v_cache = None
    return scales


def choose_scales(runner, model_path: Path) -> tuple[list[torch.Tensor], str]:
    """(per-layer scales on the runner's device, where they came from) for an fp8 cache."""
    from nanovllm.models.loader import weight_files

    a, c = runner.args, runner.config
    try:
        files = weight_files(model_path)
    except FileNotFoundError:  # a checkpoint without safetensors files (GGUF) ships no scales
        files = []
    scales = checkpoint_scales(files, a.num_layers, a.num_kv_heads)
    source = "checkpoint"
    if scales is None:
        limit = min(CALIBRATION_TOKENS, c.max_model_len - 1, c.max_num_batched_tokens)
        ids = calibration_ids(model_path, a.vocab_size, limit)
        scales = calibrate(runner, ids)
        source = f"calibrated over {len(ids)} tokens"
    return [s.to(device=runner.device, dtype=torch.float32).contiguous() for s in scales], source
