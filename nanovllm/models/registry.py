"""Model families by Hugging Face architecture name."""

from __future__ import annotations

import importlib

from nanovllm.ops import Target

# architecture -> module under nanovllm.models with a `build(hf_config, resolver)` function
ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # text weights only (loader.text_only)
}


def build_model(hf_config, resolver):
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return importlib.import_module(f"nanovllm.models.{ARCHITECTURES[arch]}").build(hf_config, resolver)
    raise ValueError(f"unsupported model architecture {archs or '(none in config.json)'}; "
                     f"supported: {', '.join(sorted(ARCHITECTURES))}")


def model_target(hf_config, device_type: str, dtype) -> Target:
    """What the op registry resolves a model's kernels for: the device type, the dtype and the shapes that
    backends' support checks read."""
    c = hf_config
    heads = c.num_attention_heads
    shapes = dict(hidden=c.hidden_size, heads=heads, kv_heads=getattr(c, "num_key_value_heads", heads),
                  head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                  intermediate=getattr(c, "intermediate_size", 0), vocab=c.vocab_size,
                  windows=bool(getattr(c, "sliding_window", None)),
                  softcap=bool(getattr(c, "attn_logit_softcapping", None)))
    return Target(device_type, dtype, shapes)
