"""Model families by Hugging Face architecture name."""

from __future__ import annotations

import importlib

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
