"""Mistral: Llama's layout with sliding-window attention (config.sliding_window, on every layer)."""

from nanovllm.models import llama


def build(hf_config, resolver):
    return llama.build(hf_config, resolver)
