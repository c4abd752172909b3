"""Logits of our engine against transformers on the same weights: a prefill, then 32 teacher-forced
decode steps, through the real scheduler and paged KV cache."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM
from nanovllm.engine.teacher_forcing import teacher_forced_logits

CONFIGS = {
    "gqa1-tied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gqa4-tied": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=96, num_hidden_layers=3),
    "odd-vocab-untied": dict(vocab_size=1001, tie_word_embeddings=False, num_key_value_heads=1),
}


def hf_logits(path, ids: list[int], start: int, dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, start - 1:].float()


def run_case(path, config, backend, dtype, seed=0, block_size=16, chunk=8192):
    torch.manual_seed(seed)
    vocab = config.get("vocab_size", 151936)
    prompt = torch.randint(0, vocab, (37,)).tolist()
    forced = torch.randint(0, vocab, (32,)).tolist()
    llm = LLM(str(path), dtype=dtype, max_model_len=256, num_kvcache_blocks=512 // block_size,
              kvcache_block_size=block_size, max_num_batched_tokens=chunk, kernels={"default": backend})
    ours = teacher_forced_logits(llm.engine, prompt, forced)
    return ours, hf_logits(path, prompt + forced, len(prompt), llm.config.torch_dtype)


@pytest.mark.parametrize("name", CONFIGS)
def test_eager_matches_transformers_fp32(make_checkpoint, name):
    config = CONFIGS[name]
    ours, ref = run_case(make_checkpoint(**config), config, "eager", "float32")
    assert ours.shape == ref.shape == (33, config.get("vocab_size", 151936))
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gqa2-untied", "odd-vocab-untied"])
def test_compile_matches_transformers_fp32(make_checkpoint, name):
    config = CONFIGS[name]
    ours, ref = run_case(make_checkpoint(**config), config, "compile", "float32")
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_bf16_close_to_transformers(make_checkpoint):
    config = CONFIGS["gqa2-untied"]
    ours, ref = run_case(make_checkpoint(**config), config, "eager", "bfloat16")
    err = (ours - ref).norm() / ref.norm()
    assert err < 2e-2, f"relative error {err:.3e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_chunked_prefill_and_small_blocks_match(make_checkpoint):
    """A prompt split over several steps, with blocks smaller than the chunks, gives the same logits."""
    config = CONFIGS["gqa2-untied"]
    ours, ref = run_case(make_checkpoint(**config), config, "eager", "float32", block_size=4, chunk=10)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_wrong_weights_are_detected(make_checkpoint):
    """The comparison can fail: a different seed's weights give different logits."""
    config = CONFIGS["gqa2-untied"]
    ours, _ = run_case(make_checkpoint(**config), config, "eager", "float32")
    _, other = run_case(make_checkpoint(seed=1, **config), config, "eager", "float32")
    assert not torch.allclose(ours, other, atol=1e-3)
