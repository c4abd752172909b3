"""GGUF files as Hugging Face folders: every tensor dequantized to float32 and renamed, a transformers
config built from the metadata, and the tokenizer (with its chat template) converted by transformers.

The folder is then loaded by the same loader as any checkpoint, and transformers can load it too, which
is how GGUF models are tested. Tensor names, llama.cpp's Q/K permutation of llama-architecture files and
Gemma 3's stored (1 + w) norms are gguf_names.py's, shared with the native quantized reader.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from nanovllm.checkpoints.gguf_names import dense_tensor, gguf_entries, qk_row_order
from nanovllm.checkpoints.hf_config import write_config

log = logging.getLogger("nanovllm")

# GGUF architecture -> (transformers config class, HF architecture)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
# metadata key (after "<arch>.") -> config key
CONFIG_KEYS = {
    "context_length": "max_position_embeddings", "embedding_length": "hidden_size", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta", "attention.key_length": "head_dim", "vocab_size": "vocab_size",
    "attention.sliding_window": "sliding_window", "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok", "expert_feed_forward_length": "moe_intermediate_size",
}
# Gemma GGUFs carry no chat template; this is Gemma's turn format. No <bos> in it: the tokenizer adds one.
GEMMA_CHAT_TEMPLATE = (
    "{%- set sys = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ (sys if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")


def read_metadata(reader) -> dict:
    """Scalar and string metadata (the large tokenizer arrays are left to transformers)."""
    skip = ("tokens", "merges", "token_type", "scores")
    return {key: field.contents() for key, field in reader.fields.items()
            if not (key.startswith("tokenizer.ggml.") and key.endswith(skip))}


def hf_config(reader):
    """The transformers config of a GGUF file, from its metadata."""
    import transformers

    meta = read_metadata(reader)
    arch = meta["general.architecture"]
    if arch not in ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
    cls_name, hf_arch = ARCHS[arch]
    kw = {cfg: meta[f"{arch}.{key}"] for key, cfg in CONFIG_KEYS.items() if f"{arch}.{key}" in meta}
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF files with rope_freqs (llama 3.1+ rope scaling) are not supported; "
                         "load the original Hugging Face folder instead")
    kw.setdefault("vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data))
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    kw["tie_word_embeddings"] = "output.weight" not in names
    for key, cfg in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                     ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            kw[cfg] = int(meta[f"tokenizer.ggml.{key}"])
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        kw["rope_scaling"] = dict(rope_type=scaling, factor=float(meta[f"{arch}.rope.scaling.factor"]))
        if f"{arch}.rope.scaling.original_context_length" in meta:
            kw["rope_scaling"]["original_max_position_embeddings"] = int(
                meta[f"{arch}.rope.scaling.original_context_length"])
    if arch != "gemma3":
        kw.pop("sliding_window", None)  # llama.cpp runs the other architectures with full attention
    if arch == "qwen3moe":
        kw["norm_topk_prob"] = True  # llama.cpp always renormalizes the top-k weights
    if arch == "gemma3":
        _gemma3(kw)
    return getattr(transformers, cls_name)(**kw, architectures=[hf_arch]), arch


def _gemma3(kw: dict) -> None:
    """Gemma 3 facts GGUF does not store, as llama.cpp assumes them: every 6th layer global, local rope
    base 10k, and the attention scale (the 27B model scales by hidden / heads, the others by head_dim)."""
    n = kw["num_hidden_layers"]
    kw["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    kw["query_pre_attn_scalar"] = kw["hidden_size"] // kw["num_attention_heads"] if n == 62 else kw["head_dim"]
    full = dict(rope_type="default", rope_theta=kw.pop("rope_theta", 1e6))
    if "rope_scaling" in kw:
        full.update(kw.pop("rope_scaling"))
    kw["rope_parameters"] = dict(full_attention=full, sliding_attention=dict(rope_type="default", rope_theta=1e4))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation of a weight's output rows."""
    return w[qk_row_order(w.shape[0], n_head)]


def hf_tensors(reader, arch: str, config):
    """(HF name, float32 tensor) for every tensor of the file, dequantized."""
    from gguf.quants import dequantize

    last = None  # (tensor name, dequantized array): the experts of one tensor come in a row
    for entry in gguf_entries(reader, arch, config):
        t = entry.tensor
        if last is None or last[0] != t.name:
            last = t.name, dequantize(t.data, t.tensor_type)
        yield entry.hf_name, dense_tensor(entry, last[1] if entry.expert is None else last[1][entry.expert])


SOURCE_NAME = "model.gguf"  # the GGUF file itself inside the folder, which the native quantized reader reads


def gguf_to_hf(gguf_path: Path, dest: Path, keep_source: str = "link") -> None:
    """Write a complete Hugging Face folder for a GGUF file into `dest` (an existing empty folder). The folder
    also holds the GGUF file as model.gguf, so it can be read without dequantizing: a symbolic link to
    `gguf_path` (keep_source "link") or the file moved in ("move", for a file assembled only for this)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_path = Path(gguf_path)
    reader = GGUFReader(str(gguf_path))
    config, arch = hf_config(reader)
    tensors = dict(hf_tensors(reader, arch, config))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    write_config(config, dest, torch.float32)
    eos = _write_tokenizer(gguf_path, dest, arch)
    generation = dict(bos_token_id=config.bos_token_id, eos_token_id=eos,
                      pad_token_id=getattr(config, "pad_token_id", None))
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    source = dest / SOURCE_NAME
    if keep_source == "move":
        gguf_path.replace(source)
    else:
        source.symlink_to(gguf_path.resolve())
    (dest / "README.md").write_text(
        f"# {gguf_path.name}\n\nConverted by nano-vllm from GGUF: every tensor dequantized to float32, "
        f"config and tokenizer from the GGUF metadata; {SOURCE_NAME} is the GGUF file itself.\n")


def _write_tokenizer(gguf_path: Path, dest: Path, arch: str) -> list[int]:
    """Tokenizer files (with the chat template) into dest; returns the ids that end a turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    if not tok.chat_template and arch == "gemma3":
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    tok.save_pretrained(str(dest))
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if arch == "gemma3" and "<end_of_turn>" in tok.get_vocab():
        eos.append(tok.convert_tokens_to_ids("<end_of_turn>"))
    return eos
