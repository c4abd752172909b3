"""Every model family against transformers on tiny random checkpoints: logits of a prefill and 32
teacher-forced decode steps through the real scheduler and paged KV cache (float32, tight tolerances),
and the greedy choice of every step."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import randomize_constants, save_with_tokenizer

TINY = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, vocab_size=512, max_position_embeddings=256, initializer_range=0.05)

# name -> (config class, overrides). Windows of 8 tokens and rope scaling with a short original context
# make those features change the logits of a 69-token sequence.
FAMILIES = {
    "llama3-untied": ("LlamaConfig", dict(
        tie_word_embeddings=False, rope_theta=50000.0, architectures=["LlamaForCausalLM"],
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    "smollm2-like": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1, rope_theta=100000.0,
                                         architectures=["LlamaForCausalLM"])),
    "mistral-window": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False,
                                             architectures=["MistralForCausalLM"])),
    "qwen2-bias": ("Qwen2Config", dict(tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])),
    "qwen2-window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                         architectures=["Qwen2ForCausalLM"])),
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=24, rope_theta=1e6,
        rope_local_base_freq=10000.0, layer_types=["sliding_attention", "full_attention"] * 2,
        architectures=["Gemma3ForCausalLM"])),
    "gemma3-softcap": ("Gemma3TextConfig", dict(
        num_hidden_layers=2, sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=False,
        architectures=["Gemma3ForCausalLM"])),
    "qwen3-moe": ("Qwen3MoeConfig", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1],
        architectures=["Qwen3MoeForCausalLM"])),
    "qwen3-moe-unnormed": ("Qwen3MoeConfig", dict(
        num_experts=4, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False, decoder_sparse_step=2,
        tie_word_embeddings=True, architectures=["Qwen3MoeForCausalLM"])),
}


def make_config(name: str):
    import transformers

    cls, overrides = FAMILIES[name]
    return getattr(transformers, cls)(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory, tokenizer_dir):
    """family_checkpoint(name) -> a saved HF folder with random weights (norms, biases and routers too)."""
    made = {}

    def make(name: str):
        if name in made:
            return made[name]
        from transformers import AutoModelForCausalLM

        config = make_config(name)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
        # Gemma's (1 + w) norms start at 0, the others at 1
        randomize_constants(model, norm_center=0.0 if "gemma" in name else 1.0)
        made[name] = save_with_tokenizer(model, tmp_path_factory.mktemp(name), tokenizer_dir)
        return made[name]

    return make


def hf_logits(path, ids: list[int], start: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, start - 1:].float()


def run_case(path, backend="eager", block_size=16, chunk=8192, seed=0):
    from nanovllm import LLM
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    torch.manual_seed(seed)
    prompt, forced = torch.randint(0, 512, (37,)).tolist(), torch.randint(0, 512, (32,)).tolist()
    llm = LLM(str(path), dtype="float32", max_model_len=256, num_kvcache_blocks=512 // block_size,
              kvcache_block_size=block_size, max_num_batched_tokens=chunk, kernels={"default": backend})
    ours = teacher_forced_logits(llm.engine, prompt, forced)
    table = llm.kernel_table
    llm.close()
    return ours, hf_logits(path, prompt + forced, len(prompt)), table


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_transformers_fp32(family_checkpoint, name):
    ours, ref, _ = run_case(family_checkpoint(name))
    assert ours.shape == ref.shape == (33, 512)
    torch.testing.assert_close(ours, ref, atol=3e-5, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_gemma3_chunked_prefill_small_blocks(family_checkpoint):
    """Windows and per-layer rope tables stay right when the prompt spans several steps and blocks."""
    ours, ref, table = run_case(family_checkpoint("gemma3"), block_size=4, chunk=10)
    torch.testing.assert_close(ours, ref, atol=3e-5, rtol=1e-4)
    assert {"post_norm_attn_out", "gelu_mlp", "post_norm_residual"} <= set(table["0"])


def test_moe_layers_resolve_the_moe_site(family_checkpoint):
    _, _, table = run_case(family_checkpoint("qwen3-moe"))
    assert "moe_mlp" in table["0"] and "moe" in table["0"] and "mlp" not in table["0"]
    assert "mlp" in table["1"] and "moe_mlp" not in table["1"]  # mlp_only_layers=[1]


@pytest.mark.parametrize("name", ["gemma3-softcap", "qwen3-moe"])
def test_forward_has_no_graph_breaks(family_checkpoint, name):
    """Per-layer rope tables, sandwich-norm sites and the MoE block trace as one graph (whole-model compile)."""
    from nanovllm import LLM

    with LLM(str(family_checkpoint(name)), dtype="float32", max_model_len=128, num_kvcache_blocks=16) as llm:
        engine = llm.engine
        engine.add_request(list(range(1, 9)), None)
        batch = engine.scheduler.schedule()
        input_ids, positions, meta, _ = engine.runner.prepare(batch)
        explanation = torch._dynamo.explain(engine.runner.model)(input_ids, positions, meta)
        engine.abort_request(batch[0].seq.request_id)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_greedy_generation_matches_transformers(family_checkpoint):
    from transformers import AutoModelForCausalLM

    from nanovllm import LLM, SamplingParams

    path = family_checkpoint("gemma3")
    prompt = list(range(5, 25))
    with LLM(str(path), dtype="float32", max_model_len=128, num_kvcache_blocks=16) as llm:
        ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]["token_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert ours == ref[0, len(prompt):].tolist()


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path, tokenizer_dir):
    """Gemma3ForConditionalGeneration: the language weights load into the text model, the vision tower is
    skipped, and the logits match transformers' multimodal model on text."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = make_config("gemma3").to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                        image_token_index=511, boi_token_index=509,
                                                        eoi_token_index=510)).float()
    save_with_tokenizer(randomize_constants(model, norm_center=0.0), tmp_path, tokenizer_dir)
    ours, ref, _ = run_case(tmp_path)
    torch.testing.assert_close(ours, ref, atol=3e-5, rtol=1e-4)


def test_moe_native_paths_agree():
    """The gathered (few tokens) and the dense-over-experts (many tokens) paths of the moe op agree."""
    from nanovllm.ops import family_ops

    torch.manual_seed(0)
    e, h, i, k = 6, 24, 10, 2
    gate_up, down = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    x = torch.randn(9, h)
    weights, ids = family_ops.topk_route(torch.randn(9, e), k, True)
    full = family_ops.moe(x, gate_up, down, weights, ids)
    for n in range(0, 9, 3):  # 3 tokens * 2 = 6 <= 6 experts: the gathered path
        torch.testing.assert_close(family_ops.moe(x[n:n + 3], gate_up, down, weights[n:n + 3], ids[n:n + 3]),
                                   full[n:n + 3], atol=1e-4, rtol=1e-5)


TRITON_CHECK = r"""
import torch
from nanovllm.ops import Target, load_plugins, resolve
from nanovllm.ops import family_ops

load_plugins()
fn, used = resolve("moe", "triton", Target("cpu", torch.float32), allow_fallback=False)
assert used == "triton"
torch.manual_seed(0)
for n, e, h, i, k in [(1, 8, 64, 48, 2), (5, 6, 40, 36, 3), (3, 4, 72, 20, 4)]:  # odd sizes: masked tails
    x, gate_up, down = torch.randn(n, h), torch.randn(e, 2 * i, h) * 0.2, torch.randn(e, h, i) * 0.2
    weights, ids = family_ops.topk_route(torch.randn(n, e), k, n % 2 == 1)
    torch.testing.assert_close(fn(x, gate_up, down, weights, ids), family_ops.moe(x, gate_up, down, weights, ids),
                               atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_triton_fused_moe_matches_native_in_the_interpreter():
    """kernels/triton/fused_moe.py on the CPU through TRITON_INTERPRET=1 (set before triton is imported,
    hence a fresh interpreter)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
