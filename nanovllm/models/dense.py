"""The decoder-only transformer shared by every family: Qwen3, Qwen2, Llama, Mistral, Gemma 3, Qwen3-MoE.

Every op goes through the registry: a layer holds the callables resolved for it at construction,
so the forward pass has no dispatch. Q/K/V and gate/up are packed into one weight each at load time.
Families differ only by DenseArgs flags (norm placement, activation, MoE, rope per layer type ...)
and small subclasses that rename checkpoint tensors.

A linear weight the resolver names quantized (OpResolver.weight_formats) starts as a placeholder on the meta
device, so no dense copy is ever allocated; loading installs a QuantizedWeight in its place (install_weight).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

import nanovllm.ops.family_ops  # noqa: F401  (defines gelu_mlp, moe ...; until ops/__init__ imports it)
from nanovllm.layers.rotary import cos_sin_table
from nanovllm.ops import COMPILE, MODEL_SCOPE, NATIVE, AttentionMetadata, OpResolver, RegistryError, get_op
from nanovllm.ops.registry import DENSE
from nanovllm.ops.sites import AttentionSettings, LayerWeights
from nanovllm.quant.plan import LAYER_WEIGHTS, LM_HEAD
from nanovllm.quant.weights import is_quantized

LAYER_OPS = ("norm_qkv", "qk_norm_rope", "attention_prefill", "attention_decode",
             "rope_decode_attention", "attn_out", "mlp", "decode_layer")
MODEL_OPS = ("embedding", "rms_norm", "linear", "sample", "lm_head_sample", "verify_layout", "verify_accept",
             "ngram_lookup")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


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
    # Gemma-style options
    activation: str = "silu"              # "silu" (mlp site) or "gelu_tanh" (gelu_mlp site)
    sandwich_norms: bool = False          # RMSNorm after attention and after the MLP too
    norm_offset: float = 0.0              # added to norm weights at load time ((1 + w) norms become plain)
    embed_scale: float = 0.0              # embeddings times this (in the activation dtype); 0 = none
    attn_scale: float = 0.0               # 0: head_dim ** -0.5
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    rope_types: tuple[str, ...] = ()      # per layer: the rope parameters' layer type (one table per type)
    # sparse MoE options (Qwen3-MoE)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()     # per layer: MoE block instead of the dense MLP

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



# where new weights are allocated: None (the current default device) or "meta" inside deferred_weights()
_WEIGHT_DEVICE: ContextVar[str | None] = ContextVar("weight_device", default=None)


@contextmanager
def deferred_weights():
    """Models built inside get their weights as meta-device placeholders (shapes only, no memory), which the
    builder then places: on the device in the model dtype, or in host memory (engine/weight_offload.py)."""
    token = _WEIGHT_DEVICE.set("meta")
    try:
        yield
    finally:
        _WEIGHT_DEVICE.reset(token)


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=_WEIGHT_DEVICE.get()), requires_grad=False)


def _weight(fmt: str, *shape) -> nn.Parameter:
    """A linear weight: a Parameter, or for a quantized one a meta-device placeholder that loading replaces."""
    return _param(*shape) if fmt == DENSE else nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def layer_weights(args: DenseArgs, idx: int) -> tuple[str, ...]:
    """The linear weights a layer's ops read, by parameter name (a MoE layer's router and experts stay dense)."""
    if args.moe_layers and args.moe_layers[idx]:
        return ("qkv_proj", "o_proj", "router", "experts_gate_up", "experts_down")
    return LAYER_WEIGHTS


def layer_ops(args: DenseArgs, idx: int) -> tuple[str, ...]:
    """The ops a layer resolves: the Qwen3 set, with the family's sites swapped in."""
    ops = list(LAYER_OPS)
    plain = True  # a pre-norm layer with a dense SiLU MLP: its decode step is the decode_layer site
    if args.sandwich_norms:
        ops[ops.index("attn_out")] = "post_norm_attn_out"
        ops.append("post_norm_residual")
        plain = False
    if args.moe_layers and args.moe_layers[idx]:
        ops[ops.index("mlp")], plain = "moe_mlp", False
    elif args.activation == "gelu_tanh":
        ops[ops.index("mlp")], plain = "gelu_mlp", False
    elif args.activation != "silu":
        raise ValueError(f"unsupported MLP activation {args.activation!r}; supported: silu, gelu_tanh")
    return tuple(op for op in ops if plain or op != "decode_layer")


class DenseLayer(nn.Module):
    def __init__(self, args: DenseArgs, ops, idx: int, formats: dict[str, str] | None = None):
        """formats: the quantized weights of this layer (parameter name -> format); the others are dense."""
        super().__init__()
        self.ops, self.idx, self.args = ops, idx, args
        self.formats = {name: fmt for name, fmt in (formats or {}).items() if fmt != DENSE and name in LAYER_WEIGHTS}
        fmt = lambda name: self.formats.get(name, DENSE)  # noqa: E731
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.split = (q, kv, kv)
        self.input_norm = _param(args.hidden_size)
        self.qkv_proj = _weight(fmt("qkv_proj"), q + 2 * kv, args.hidden_size)
        self.qkv_bias = _param(q + 2 * kv) if args.qkv_bias else None
        self.q_norm = _param(args.head_dim) if args.qk_norm else None
        self.k_norm = _param(args.head_dim) if args.qk_norm else None
        self.o_proj = _weight(fmt("o_proj"), args.hidden_size, q)
        self.post_attn_norm = _param(args.hidden_size) if args.sandwich_norms else None
        self.post_norm = _param(args.hidden_size)  # the norm before the MLP
        self.post_mlp_norm = _param(args.hidden_size) if args.sandwich_norms else None
        self.moe = bool(args.moe_layers and args.moe_layers[idx])
        if self.moe:
            e, i = args.num_experts, args.moe_intermediate_size
            self.router = _param(e, args.hidden_size)
            self.experts_gate_up = _param(e, 2 * i, args.hidden_size)
            self.experts_down = _param(e, args.hidden_size, i)
        else:
            self.gate_up_proj = _weight(fmt("gate_up_proj"), 2 * args.intermediate_size, args.hidden_size)
            self.down_proj = _weight(fmt("down_proj"), args.hidden_size, args.intermediate_size)
            self.mlp = ops.gelu_mlp if args.activation == "gelu_tanh" else ops.mlp
        self.scale = args.attn_scale or args.head_dim ** -0.5
        self.window = args.sliding_window[idx] if args.sliding_window else 0
        self.rope_table = f"cos_sin_{args.rope_types[idx]}" if args.rope_types else "cos_sin"
        self.settings = AttentionSettings(args.rms_norm_eps, self.scale, self.window, args.attn_softcap)
        self.decode_weights = None
        self.bundle_decode_weights()
        self.k_cache = self.v_cache = None  # set by the model runner
        # an fp8 cache's (2, kv_heads) float32 K and V scales, set by the model runner (None: model-dtype cache)
        self.kv_scales = None

    def bundle_decode_weights(self) -> None:
        """The decode_layer site's weights (a plain pre-norm SiLU layer only): the layer's weights themselves, so
        loading into a Parameter's .data shows through; rebuilt when a weight is replaced (install_weight)."""
        if hasattr(self.ops, "decode_layer"):
            self.decode_weights = LayerWeights(
                self.input_norm, self.qkv_proj, self.qkv_bias, self.q_norm, self.k_norm, self.o_proj,
                self.post_norm, self.gate_up_proj, self.down_proj)

    def install_weight(self, name: str, weight) -> None:
        """Put `weight` (a QuantizedWeight, or a Parameter) where the weight `name` was."""
        delattr(self, name)
        setattr(self, name, weight)
        self.bundle_decode_weights()

    def feed_forward(self, h, residual):
        if self.moe:
            a = self.args
            return self.ops.moe_mlp(h, self.router, self.experts_gate_up, self.experts_down, residual, a.top_k,
                                    a.norm_topk_prob)
        return self.mlp(h, self.gate_up_proj, self.down_proj, residual)

    def forward(self, x, positions, meta: AttentionMetadata, cos_sin):
        a, ops = self.args, self.ops
        kv = () if self.kv_scales is None else (self.kv_scales,)  # the cache ops' trailing argument, fp8 only
        if meta.is_decode and self.decode_weights is not None:
            return ops.decode_layer(x, self.decode_weights, self.settings, positions, cos_sin, self.k_cache,
                                    self.v_cache, meta, *kv)
        qkv = ops.norm_qkv(x, self.input_norm, self.qkv_proj, self.qkv_bias, a.rms_norm_eps)
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim)
        k = k.view(-1, a.num_kv_heads, a.head_dim)
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        if meta.is_decode:
            o = ops.rope_decode_attention(q, k, v, self.q_norm, self.k_norm, a.rms_norm_eps, positions, cos_sin,
                                          self.k_cache, self.v_cache, meta, self.scale, self.window, a.attn_softcap,
                                          *kv)
        else:
            q = ops.qk_norm_rope(q, k, v, self.q_norm, self.k_norm, a.rms_norm_eps, positions, cos_sin,
                                 self.k_cache, self.v_cache, meta.slot_mapping, *kv)
            o = ops.attention_prefill(q, self.k_cache, self.v_cache, meta, self.scale, self.window, a.attn_softcap, *kv)
        if not a.sandwich_norms:
            h, x = ops.attn_out(o.flatten(1), self.o_proj, x, self.post_norm, a.rms_norm_eps)
            return self.feed_forward(h, x)
        h, x = ops.post_norm_attn_out(o.flatten(1), self.o_proj, x, self.post_attn_norm, self.post_norm,
                                      a.rms_norm_eps)
        return ops.post_norm_residual(self.feed_forward(h, None), self.post_mlp_norm, x, a.rms_norm_eps)


class DenseCausalLM(nn.Module):
    """HF names map onto these parameters through `packed` (q/k/v and gate/up) and `renames`."""

    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    renames = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head",
               "input_layernorm.weight": "input_norm", "post_attention_layernorm.weight": "post_norm",
               "self_attn.qkv_proj.weight": "qkv_proj", "self_attn.qkv_proj.bias": "qkv_bias",
               "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
               "self_attn.o_proj.weight": "o_proj", "mlp.gate_up_proj.weight": "gate_up_proj",
               "mlp.down_proj.weight": "down_proj", "mlp.gate.weight": "router",
               "mlp.experts.gate_up_proj": "experts_gate_up", "mlp.experts.down_proj": "experts_down"}

    def __init__(self, args: DenseArgs, resolver: OpResolver, hf_config):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList()
        for i in range(args.num_layers):
            weights = layer_weights(args, i)
            formats = {w: resolver.weight_format(f"layers.{i}.{w}") for w in weights}
            self.layers.append(DenseLayer(args, resolver.scope(i, layer_ops(args, i), weights), i, formats))
        self.ops = resolver.scope(MODEL_SCOPE, MODEL_OPS, (LM_HEAD,))
        self.embed = _param(args.vocab_size, args.hidden_size)
        self.final_norm = _param(args.hidden_size)
        lm_head_format = resolver.weight_format(LM_HEAD)
        # a quantized LM head is its own weight even where the checkpoint ties it to the embeddings
        self.lm_head = (self.embed if args.tie_word_embeddings and lm_head_format == DENSE
                        else _weight(lm_head_format, args.vocab_size, args.hidden_size))
        # the quantized weights (parameter name -> format): placeholders until loading installs them
        self.quantized = {f"layers.{layer.idx}.{name}": fmt for layer in self.layers
                          for name, fmt in layer.formats.items()}
        if lm_head_format != DENSE:
            self.quantized[LM_HEAD] = lm_head_format
        for layer_type in sorted(set(args.rope_types)) or [None]:  # one table per rope layer type
            name = f"cos_sin_{layer_type}" if layer_type else "cos_sin"
            self.register_buffer(name, cos_sin_table(hf_config, args.head_dim, args.max_positions, layer_type),
                                 persistent=False)
        # HF multiplies by sqrt(hidden) rounded to the activation dtype; keep it as a float32 buffer and cast.
        self.register_buffer("embed_scale", torch.tensor(args.embed_scale or 1.0), persistent=False)
        # streams host-resident layer weights into device staging slots around each layer (cpu_offload_gb)
        self.offloader = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        x = self.ops.embedding(input_ids, self.embed, self.embed_scale if self.args.embed_scale else None)
        offloader = self.offloader
        for layer in self.layers:
            if offloader is not None:
                offloader.before_layer(layer.idx)
            x = layer(x, positions, meta, getattr(self, layer.rope_table))
            if offloader is not None:
                offloader.after_layer(layer.idx)
        return x

    # (site, its weight argument or LayerWeights field) -> the layer parameter passed there, for backends' layouts
    SITE_WEIGHTS = {("norm_qkv", "qkv_w"): "qkv_proj", ("attn_out", "o_w"): "o_proj",
                    ("mlp", "gate_up_w"): "gate_up_proj", ("mlp", "down_w"): "down_proj",
                    ("decode_layer", "qkv_w"): "qkv_proj", ("decode_layer", "o_w"): "o_proj",
                    ("decode_layer", "gate_up_w"): "gate_up_proj", ("decode_layer", "down_w"): "down_proj"}

    def install_weight(self, name: str, weight) -> None:
        """Put `weight` (a QuantizedWeight) where the parameter `name` ("layers.3.qkv_proj", "lm_head") was."""
        owner, _, attr = name.rpartition(".")
        if owner:
            self.get_submodule(owner).install_weight(attr, weight)
        else:
            delattr(self, attr)
            setattr(self, attr, weight)

    def apply_weight_layouts(self, resolver: OpResolver) -> None:
        """Once, after loading: each layer's weights in the layout its sites' backends read (Impl.layouts),
        a QuantizedWeight included (its layouts use map_rows). Sites that share a weight must agree on its
        layout (a parameter has one)."""
        for layer in self.layers:
            used = resolver.table.get(str(layer.idx), {})
            readers: dict[str, dict] = {}  # parameter -> {layout (None: as loaded): "site (backend)"}
            for (op, arg), name in self.SITE_WEIGHTS.items():
                if op in used and self._reads_weights(op, used[op]) and getattr(layer, name, None) is not None:
                    convert = get_op(op).impls[used[op]].layouts.get(arg)
                    readers.setdefault(name, {}).setdefault(convert, f"{op} ({used[op]})")
            for name, layouts in readers.items():
                if len(layouts) > 1:
                    raise RegistryError(
                        f"layer {layer.idx}: {name} is read in different layouts by {' and '.join(layouts.values())}"
                        "; choose backends that agree (e.g. the same Triton preset for both)")
                convert = next(iter(layouts))
                if convert is None:
                    continue
                weight = getattr(layer, name)
                if is_quantized(weight):
                    layer.install_weight(name, convert(weight))
                else:
                    weight.data = convert(weight.data)

    @classmethod
    def _reads_weights(cls, op: str, backend: str) -> bool:
        """False for a site's composition (eager, compile) built of sites that read the weights themselves."""
        sites = {site for site, _ in cls.SITE_WEIGHTS}
        return backend not in (NATIVE, COMPILE) or not sites.intersection(get_op(op).parts)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(self.ops.rms_norm(h, self.final_norm, self.args.rms_norm_eps), self.lm_head)
        cap = self.args.final_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def sample(self, h: torch.Tensor, temperature, top_k, top_p, min_p, noise) -> torch.Tensor:
        if self.args.final_softcap:  # lm_head_sample has no soft-capping: sample from capped logits
            return self.ops.sample(self.compute_logits(h), temperature, top_k, top_p, min_p, noise)
        return self.ops.lm_head_sample(h, self.final_norm, self.args.rms_norm_eps, self.lm_head,
                                       temperature, top_k, top_p, min_p, noise)

    def convert_tensor(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor in our convention: (1 + w) norms become plain norm weights."""
        if self.args.norm_offset and hf_name.endswith("norm.weight"):
            return tensor.float() + self.args.norm_offset
        return tensor

    def skips(self, hf_name: str) -> bool:
        """Checkpoint tensors this model leaves out on purpose (a multimodal model's vision tower)."""
        return False

    def param_name(self, hf_name: str) -> tuple[str, int | tuple | None] | None:
        """Our parameter for an HF tensor name, and the shard for packed weights: an index into
        shard_sizes, or (expert, index or None) for per-expert MoE tensors."""
        if (m := _EXPERT.search(hf_name)) and hf_name.startswith("model.layers."):
            idx, expert, proj = hf_name.split(".")[2], int(m[1]), m[2]
            if proj == "down":
                return f"layers.{idx}.experts_down", (expert, None)
            return f"layers.{idx}.experts_gate_up", (expert, 0 if proj == "gate" else 1)
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
        if param.endswith("experts_gate_up"):
            return [a.moe_intermediate_size, a.moe_intermediate_size]
        return [a.intermediate_size, a.intermediate_size]

    def shard_view(self, param: str, shard, data: torch.Tensor) -> torch.Tensor:
        """The part of a parameter's data that one checkpoint tensor fills."""
        if shard is None:
            return data
        if isinstance(shard, tuple):
            data, shard = data[shard[0]], shard[1]
            if shard is None:
                return data
        sizes = self.shard_sizes(param)
        return data.narrow(0, sum(sizes[:shard]), sizes[shard])

    def num_shards(self, param: str) -> int:
        """How many checkpoint tensors fill a parameter (loading checks that all came)."""
        experts = self.args.num_experts
        if param.endswith(("qkv_proj", "qkv_bias")):
            return 3
        if param.endswith("gate_up_proj"):
            return 2
        return {"experts_gate_up": 2 * experts, "experts_down": experts}.get(param.rsplit(".", 1)[-1], 1)
