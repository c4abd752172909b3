"""A tiny Qwen3 shape with transformers' random weights, built into our model with chosen weight formats."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=256, tie_word_embeddings=False, **TINY)
    config.architectures = ["Qwen3ForCausalLM"]
    return Qwen3ForCausalLM(config).eval()


def build(hf_config, weight_formats=None, kernels=None):
    from nanovllm.models.registry import build_model, model_target
    from nanovllm.ops import OpResolver

    resolver = OpResolver(kernels or {"default": "eager"}, model_target(hf_config, "cpu", torch.float32),
                          hf_config.num_hidden_layers, weight_formats)
    model = build_model(hf_config, resolver)
    for p in model.parameters():
        p.data = p.data.float()
    return model, resolver
