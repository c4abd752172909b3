"""Qwen3 (dense): the shared dense decoder with per-head q/k RMSNorm."""

from nanovllm.models.dense import DenseArgs, DenseCausalLM


def build(hf_config, resolver):
    args = DenseArgs.from_hf(hf_config, qk_norm=True, qkv_bias=bool(getattr(hf_config, "attention_bias", False)))
    return DenseCausalLM(args, resolver, hf_config)
