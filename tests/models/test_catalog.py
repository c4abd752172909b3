"""Named models: materialized once, atomically, loadable by transformers; random weights that are
deterministic; clear errors for anything that is not a model."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanovllm.checkpoints import CATALOG, RANDOM_NOTE, CatalogEntry, qwen3_config, resolve_model
from nanovllm.checkpoints import resolve as resolving
from nanovllm.checkpoints import write_random_checkpoint as write_random

pytestmark = pytest.mark.usefixtures("cache")  # every test gets an empty model cache (models/conftest.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOVLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(resolving, "_noted", set())
        return resolve_model("tiny")


def small_config(**kw):
    return qwen3_config(vocab_size=512, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=64, **kw)


def test_tiny_is_a_complete_hf_folder(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    assert "random" in (tiny / "README.md").read_text()
    assert json.loads((tiny / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["rope_theta"] == 1e6
    assert config["torch_dtype"] == "float32"
    weights = load_file(tiny / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied to the embedding
    assert weights["model.embed_tokens.weight"].shape == (151936, 64)
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_tiny_loads_with_transformers_offline(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)
    assert model.config.rope_parameters["rope_theta"] == 1e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok("Hello, world! 你好", return_tensors="pt").input_ids
    assert ids.tolist() == [[9707, 11, 1879, 0, 220, 108386]]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 6, 151936) and torch.isfinite(logits).all()


def test_second_resolve_reuses_the_folder(tiny, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tiny.parent.parent))
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny") == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_warns_that_weights_are_random(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(resolving, "_noted", set())
    entry = CatalogEntry("fake", "a fake", _write_config_only, note=RANDOM_NOTE)
    monkeypatch.setitem(CATALOG, "fake", entry)
    with caplog.at_level("WARNING"):
        resolve_model("fake")
    assert "weights are random" in caplog.text and "model.name=/path/to/hf/folder" in caplog.text


def test_catalog_names():
    assert CATALOG["qwen3-0.6b-random"] is CATALOG["default"]
    assert {"default", "tiny"} <= set(CATALOG)
    assert all(entry.description for entry in CATALOG.values())


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    config = small_config()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_random(config, tmp_path / name, seed=seed, tokenizer=False)
    data = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert data["a"] == data["b"]
    assert data["a"] != data["c"]


def test_random_weights_follow_the_recipe(tmp_path):
    config = small_config(attention_bias=True)
    write_random(config, tmp_path / "bf16", tokenizer=False)
    write_random(config, tmp_path / "fp32", dtype=torch.float32, tokenizer=False)
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    assert bf16.keys() == fp32.keys() and "lm_head.weight" not in bf16
    for name, t in fp32.items():
        assert torch.equal(bf16[name], t.to(torch.bfloat16)), name  # values do not depend on the dtype
        if "norm" in name:
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith("bias"):
            assert torch.equal(t, torch.zeros_like(t)), name
    assert abs(fp32["model.embed_tokens.weight"].std().item() - 0.02) < 1e-3
    assert not (tmp_path / "bf16" / "tokenizer.json").exists()


def test_default_config_has_qwen3_0_6b_parameter_count(cache):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3_config())
    assert sum(p.numel() for p in model.parameters()) == 596_049_920
    assert not cache.exists()  # nothing was materialized


def test_unknown_name_lists_catalog(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message and "config.json" in message
    assert "default" in message and "tiny" in message and "qwen3-0.6b-random" in message
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        resolve_model(str(tmp_path / "no-such-dir"))


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json") as err:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_local_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def _write_config_only(dest: Path) -> None:
    (dest / "config.json").write_text('{"model_type": "qwen3"}')


def test_interrupted_write_leaves_no_usable_folder(cache, monkeypatch):
    def crash(dest: Path) -> None:
        _write_config_only(dest)
        raise KeyboardInterrupt  # e.g. ^C while the weights are written

    monkeypatch.setitem(CATALOG, "fake", CatalogEntry("fake", "a fake", crash))
    with pytest.raises(KeyboardInterrupt):
        resolve_model("fake")
    models = cache / "models"
    assert not (models / "fake").exists()
    assert not list(models.glob(".fake.partial-*"))  # cleaned up

    # A writer killed outright leaves its partial folder; it is never taken as the model.
    (models / ".fake.partial-killed").mkdir()
    _write_config_only(models / ".fake.partial-killed")
    calls = []
    entry = CatalogEntry("fake", "a fake", lambda dest: calls.append(_write_config_only(dest)))
    monkeypatch.setitem(CATALOG, "fake", entry)
    assert resolve_model("fake") == models / "fake"
    assert len(calls) == 1 and (models / "fake" / "config.json").is_file()


def test_materializer_that_writes_no_config_fails(cache, monkeypatch):
    monkeypatch.setitem(CATALOG, "fake", CatalogEntry("fake", "a fake", lambda dest: None))
    with pytest.raises(RuntimeError, match="config.json"):
        resolve_model("fake")
    assert not (cache / "models" / "fake").exists()


def test_concurrent_resolvers_write_once(cache, monkeypatch):
    calls = []

    def slow(dest: Path) -> None:
        calls.append(dest)
        time.sleep(0.3)
        _write_config_only(dest)

    monkeypatch.setitem(CATALOG, "fake", CatalogEntry("fake", "a fake", slow))
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("fake"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [cache / "models" / "fake"] * 3
    assert len(calls) == 1
