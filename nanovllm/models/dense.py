"""The dense decoder-only transformer shared by the Qwen3, Qwen2, Llama and Mistral families.

Every op goes through the registry: a layer holds the callables resolved for it at construction,
so the forward pass has no dispatch. Q/K/V and gate/up are packed into one weight each at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.layers.rotary import cos_sin_table
from nanovllm.ops import MODEL_SCOPE, AttentionMetadata, OpResolver

LAYER_OPS = ("norm_qkv", "qk_norm_rope", "attention_prefill", "attention_decode", "attn_out", "mlp")
MODEL_OPS = ("rms_norm", "linear", "sample", "lm_head_sample")


@dataclass
class DenseArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_positions: int
    tie_word_embeddings: bool
    qk_norm: bool = False
    qkv_bias: bool = False
    sliding_window: tuple[int, ...] = ()  # per layer; 0 = full attention

    @classmethod
    def from_hf(cls, c, **family) -> DenseArgs:
        heads = c.num_attention_heads
        window = getattr(c, "sliding_window", None) or 0
        if not getattr(c, "use_sliding_window", True):
            window = 0
        types = getattr(c, "layer_types", None) or ["sliding_attention"] * c.num_hidden_layers
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
            num_heads=heads, num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
            max_positions=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            sliding_window=tuple(window if t == "sliding_attention" else 0 for t in types), **family)

    def shapes(self) -> dict:
        """What kernels may check to say whether they support this model."""
        return dict(hidden=self.hidden_size, heads=self.num_heads, kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim, intermediate=self.intermediate_size, vocab=self.vocab_size)


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class DenseLayer(nn.Module):
    def __init__(self, args: DenseArgs, ops, idx: int):
        super().__init__()
        self.ops, self.idx, self.args = ops, idx, args
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.split = (q, kv, kv)
        self.input_norm = _param(args.hidden_size)
        self.qkv_proj = _param(q + 2 * kv, args.hidden_size)
        self.qkv_bias = _param(q + 2 * kv) if args.qkv_bias else None
        self.q_norm = _param(args.head_dim) if args.qk_norm else None
        self.k_norm = _param(args.head_dim) if args.qk_norm else None
        self.o_proj = _param(args.hidden_size, q)
        self.post_norm = _param(args.hidden_size)
        self.gate_up_proj = _param(2 * args.intermediate_size, args.hidden_size)
        self.down_proj = _param(args.hidden_size, args.intermediate_size)
        self.scale = args.head_dim ** -0.5
        self.window = args.sliding_window[idx] if args.sliding_window else 0
        self.k_cache = self.v_cache = None  # set by the model runner

    def forward(self, x, positions, meta: AttentionMetadata, cos_sin):
        a, ops = self.args, self.ops
        qkv = ops.norm_qkv(x, self.input_norm, self.qkv_proj, self.qkv_bias, a.rms_norm_eps)
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim)
        k = k.view(-1, a.num_kv_heads, a.head_dim)
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        q = ops.qk_norm_rope(q, k, v, self.q_norm, self.k_norm, a.rms_norm_eps, positions, cos_sin,
                             self.k_cache, self.v_cache, meta.slot_mapping)
        attention = ops.attention_decode if meta.is_decode else ops.attention_prefill
        o = attention(q, self.k_cache, self.v_cache, meta, self.scale, self.window, 0.0)
        h, x = ops.attn_out(o.flatten(1), self.o_proj, x, self.post_norm, a.rms_norm_eps)
        return ops.mlp(h, self.gate_up_proj, self.down_proj, x)


class DenseCausalLM(nn.Module):
    """HF names map onto these parameters through `packed` (q/k/v and gate/up) and `renames`."""

    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    renames = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head",
               "input_layernorm.weight": "input_norm", "post_attention_layernorm.weight": "post_norm",
               "self_attn.qkv_proj.weight": "qkv_proj", "self_attn.qkv_proj.bias": "qkv_bias",
               "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
               "self_attn.o_proj.weight": "o_proj", "mlp.gate_up_proj.weight": "gate_up_proj",
               "mlp.down_proj.weight": "down_proj"}

    def __init__(self, args: DenseArgs, resolver: OpResolver, hf_config):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(DenseLayer(args, resolver.scope(i, LAYER_OPS), i)
                                    for i in range(args.num_layers))
        self.ops = resolver.scope(MODEL_SCOPE, MODEL_OPS)
        self.embed = _param(args.vocab_size, args.hidden_size)
        self.final_norm = _param(args.hidden_size)
        self.lm_head = self.embed if args.tie_word_embeddings else _param(args.vocab_size, args.hidden_size)
        self.register_buffer("cos_sin", cos_sin_table(hf_config, args.head_dim, args.max_positions),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        x = self.embed[input_ids]
        for layer in self.layers:
            x = layer(x, positions, meta, self.cos_sin)
        return x

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(self.ops.rms_norm(h, self.final_norm, self.args.rms_norm_eps), self.lm_head)

    def sample(self, h: torch.Tensor, temperature, top_k, top_p, min_p, noise) -> torch.Tensor:
        return self.ops.lm_head_sample(h, self.final_norm, self.args.rms_norm_eps, self.lm_head,
                                       temperature, top_k, top_p, min_p, noise)

    def param_name(self, hf_name: str) -> tuple[str, int | None] | None:
        """Our parameter for an HF tensor name, and the shard index for packed weights."""
        name, shard = hf_name, None
        for src, (dst, idx) in self.packed.items():
            if f".{src}." in name:
                name, shard = name.replace(f".{src}.", f".{dst}."), idx
        if name in self.renames:
            return self.renames[name], shard
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            if rest in self.renames:
                return f"layers.{idx}.{self.renames[rest]}", shard
        return None

    def shard_sizes(self, param: str) -> list[int]:
        a = self.args
        if param.endswith(("qkv_proj", "qkv_bias")):
            return [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
        return [a.intermediate_size, a.intermediate_size]
