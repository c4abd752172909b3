"""Qwen2 / Qwen2.5: the shared dense decoder with a bias on the Q/K/V projections."""

from nanovllm.models.dense import DenseArgs, DenseCausalLM


def build(hf_config, resolver):
    return DenseCausalLM(DenseArgs.from_hf(hf_config, qkv_bias=True), resolver, hf_config)
