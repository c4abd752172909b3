"""Bad input gets a clear error naming the problem, and leaves the engine and other requests untouched."""

from __future__ import annotations

import json
import shutil

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.ops import RegistryError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("prompt,message", [
    ("", "prompt is empty"),
    ([], "prompt is empty"),
    ([1, 2, 151936], "token id 151936 at position 2 is outside the vocabulary"),
    ([5, -1], "token id -1 at position 1 is outside the vocabulary"),
    ([5, 2.5], "token id 2.5 at position 1"),
    ({"text": "hi"}, "prompt must be a string or a list of token ids, got dict"),
    ([7] * 512, "prompt has 512 tokens but max_model_len is 512"),
])
def test_bad_prompts(tiny_llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate([prompt], GREEDY)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature=-0.1 is invalid"),
    (dict(top_p=0.0), "top_p=0.0 is invalid: it must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p=1.5 is invalid"),
    (dict(top_k=-2), "top_k=-2 is invalid"),
    (dict(max_tokens=0), "max_tokens=0 is invalid"),
    (dict(min_p=2.0), "min_p=2.0 is invalid"),
    (dict(stop=[""]), "stop=\\[''\\] is invalid"),
    (dict(logprobs=-1), "logprobs=-1 is invalid"),
    (dict(detokenize=0), "detokenize=0 is invalid"),
    (dict(detokenize=False, stop="x"), "detokenize=False is invalid: stop strings are matched on the text"),
])
def test_bad_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_valid_edge_sampling_values():
    for kwargs in (dict(top_k=-1), dict(top_k=0), dict(top_p=1.0), dict(temperature=0), dict(max_tokens=1)):
        SamplingParams(**kwargs)


def test_rejected_request_in_a_batch_changes_nothing(tiny_llm):
    good = [[11, 12, 13], [21, 22, 23, 24]]
    before = [r["token_ids"] for r in tiny_llm.generate(good, GREEDY)]
    with pytest.raises(ValueError, match="request 1: token id 999999"):
        tiny_llm.generate([good[0], [1, 999999], good[1]], GREEDY)
    assert not tiny_llm.engine.has_unfinished()
    assert [r["token_ids"] for r in tiny_llm.generate(good, GREEDY)] == before


def test_bad_request_while_others_run(tiny_llm):
    """At the engine level a rejected add_request leaves the running batch's results unchanged."""
    good = [[11, 12, 13], [21, 22, 23, 24]]
    expected = [r["token_ids"] for r in tiny_llm.generate(good, GREEDY)]
    engine = tiny_llm.engine
    ids = [engine.add_request(p, GREEDY) for p in good]
    got = {i: [] for i in ids}
    for out in engine.step():
        got[out.request_id] += out.token_ids
    for bad in ("", [10 ** 9], [3] * 600):
        with pytest.raises(ValueError):
            engine.add_request(bad, GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], GREEDY, request_id=ids[0])
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert [got[i] for i in ids] == expected


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))


def test_malformed_config_json(tmp_path, tiny_model):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="malformed config.json"):
        LLM(str(bad))
    (bad / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="malformed config.json.*model_type"):
        LLM(str(bad))


def test_unsupported_architecture(tmp_path, tiny_model):
    bad = tmp_path / "arch"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model architecture.*Qwen3ForCausalLM"):
        LLM(str(bad))


def test_truncated_safetensors(tmp_path, tiny_model):
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_model, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt safetensors file"):
        LLM(str(bad))
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated or corrupt safetensors file"):
        LLM(str(bad))


def test_missing_weights(tmp_path, tiny_model):
    bad = tmp_path / "missing"
    shutil.copytree(tiny_model, bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks weights for \\['layers.1.gate_up_proj'\\]"):
        LLM(str(bad))


def test_unknown_engine_arg_and_kernel_names(tiny_model):
    with pytest.raises(TypeError, match="unknown engine argument\\(s\\) \\['max_len'\\]"):
        LLM(str(tiny_model), max_len=5)
    with pytest.raises(RegistryError, match="unknown op 'mpl'"):
        LLM(str(tiny_model), kernels={"ops": {"mpl": "eager"}})
    with pytest.raises(RegistryError, match="unknown backend 'fast' for op 'mlp'"):
        LLM(str(tiny_model), kernels={"ops": {"mlp": "fast"}})
    with pytest.raises(ValueError, match="dtype='float8'"):
        LLM(str(tiny_model), dtype="float8")
    with pytest.raises(ValueError, match="short_context_graphs must be >= 0"):
        LLM(str(tiny_model), short_context_graphs=-1)
