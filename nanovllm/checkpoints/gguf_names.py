"""Which Hugging Face tensor each GGUF tensor is: the one name mapping that both the dequantizing conversion
(gguf_convert.py) and the native quantized reader (nanovllm/quant/checkpoints/gguf_native.py) use.

Each GGUF tensor becomes one or more `GGUFEntry`s: its HF name, the expert it is a slice of (MoE expert
tensors are stacked (experts, out, in) in GGUF, one tensor per expert in HF), the output-row order that undoes
llama.cpp's Q/K permutation (llama files only), and whether the value is stored as 1 + w (Gemma 3 norms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

# GGUF tensor name inside a block -> HF name inside model.layers.N (gemma3 overrides some below)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
}
GEMMA3_TENSORS = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                  "post_ffw_norm": "post_feedforward_layernorm"}
EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFEntry:
    hf_name: str
    tensor: object  # gguf.ReaderTensor
    expert: int | None = None  # index into the tensor's leading (experts) dim
    row_order: np.ndarray | None = None  # HF output row i is GGUF row row_order[i]
    stored_plus_one: bool = False  # the file holds 1 + w (Gemma 3 norms); HF keeps w


def qk_row_order(rows: int, n_head: int) -> np.ndarray:
    """The row order undoing llama.cpp's Q/K permutation: per head, its rows were reordered from
    [first half | second half] to interleaved pairs; HF row i is GGUF row order[i]."""
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows)


def gguf_entries(reader, arch: str, config):
    """A GGUFEntry per HF tensor of the file, in file order (every expert of an expert tensor in turn)."""
    layer_map = {**LAYER_TENSORS, **(GEMMA3_TENSORS if arch == "gemma3" else {})}
    for t in reader.tensors:
        if t.name in GLOBAL_TENSORS:
            name = GLOBAL_TENSORS[t.name]
            yield GGUFEntry(name, t, stored_plus_one=arch == "gemma3" and name.endswith("norm.weight"))
            continue
        m = _BLOCK.match(t.name)
        if m is None or (m[2] not in layer_map and m[2] not in EXPERT_TENSORS):
            raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart here")
        layer, kind, suffix = m.groups()
        prefix = f"model.layers.{layer}."
        if kind in EXPERT_TENSORS:
            for e in range(int(t.shape[-1])):  # GGUF shapes list the innermost dim first: (in, out, experts)
                yield GGUFEntry(f"{prefix}mlp.experts.{e}.{EXPERT_TENSORS[kind]}.{suffix}", t, expert=e)
            continue
        name = f"{prefix}{layer_map[kind]}.{suffix}"
        order = None
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
            order = qk_row_order(int(t.shape[-1]), heads)  # the output dim is GGUF's outermost
        yield GGUFEntry(name, t, row_order=order,
                        stored_plus_one=arch == "gemma3" and name.endswith("norm.weight"))


def dense_tensor(entry: GGUFEntry, w: np.ndarray) -> torch.Tensor:
    """The HF float32 tensor of an entry from its dequantized GGUF array (already the entry's expert slice)."""
    if entry.row_order is not None:
        w = w[entry.row_order]
    t = torch.from_numpy(np.array(w, dtype=np.float32))
    return t - 1 if entry.stored_plus_one else t
