"""Llama 2/3 (and SmolLM2): the shared dense decoder, no q/k norm. Scaled rope types (llama3, linear,
dynamic ...) come from transformers' rope functions through layers/rotary.py."""

from nanovllm.models.dense import DenseArgs, DenseCausalLM


def build(hf_config, resolver):
    if getattr(hf_config, "mlp_bias", False) or getattr(hf_config, "attention_bias", False):
        # Llama's attention_bias also puts a bias on o_proj, which the attn_out site does not take.
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    return DenseCausalLM(DenseArgs.from_hf(hf_config), resolver, hf_config)
