"""Shared fixtures: tiny random Qwen3 checkpoints in Hugging Face format, and engines over them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from nanovllm.checkpoints import qwen3_config
from tests.helpers import TINY, randomize_constants, save_with_tokenizer

# Tiny models run faster on one thread than on two that wait on each other.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (real model weights)")


def pytest_collection_modifyitems(config, items):
    """gpu tests are skipped without a CUDA GPU; slow ones unless asked for (--run-slow, or -m naming slow)."""
    run_slow = config.getoption("--run-slow") or "slow" in (config.getoption("markexpr") or "")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the lent GPU)")
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow or --run-slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def tokenizer_files_key(folder: Path) -> str:
    """A digest of what AutoTokenizer reads from `folder`: every file but the weights."""
    digest = hashlib.sha1()
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session", autouse=True)
def tokenizers_loaded_once():
    """Every LLM(...) loads its folder's tokenizer, seconds for Qwen's 151k-token vocabulary, and most tests'
    checkpoints carry the same tokenizer files. Within the session a folder's tokenizer is loaded once per
    distinct content and shared: engines only read their tokenizer. Loads with other options than
    local_files_only (a GGUF file's tokenizer) and hub names are not cached."""
    from transformers import AutoTokenizer

    load = AutoTokenizer.from_pretrained
    loaded = {}

    def from_pretrained(name, *args, **kwargs):
        folder = Path(name)
        if args or set(kwargs) - {"local_files_only"} or not folder.is_dir():
            return load(name, *args, **kwargs)
        key = tokenizer_files_key(folder)
        if key not in loaded:
            loaded[key] = load(name, **kwargs)
        return loaded[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
        yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from nanovllm.assets.qwen_tokenizer import write_qwen3_tokenizer

    d = tmp_path_factory.mktemp("qwen3_tokenizer")
    write_qwen3_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_dir):
    """make_checkpoint(seed=0, **qwen3 overrides) -> folder. Norm weights are randomized too, so a
    swapped or skipped norm shows up in the logits."""
    made = {}

    def make(seed: int = 0, **overrides):
        key = (seed, tuple(sorted(overrides.items())))
        if key in made:
            return made[key]
        from transformers import AutoModelForCausalLM

        config = qwen3_config(**{**TINY, **overrides})
        torch.manual_seed(seed)
        model = randomize_constants(AutoModelForCausalLM.from_config(config).float())
        made[key] = save_with_tokenizer(model, tmp_path_factory.mktemp("ckpt"), tokenizer_dir)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(make_checkpoint):
    return make_checkpoint()


@pytest.fixture(scope="session")
def tiny_llm(tiny_model):
    """A float64 engine: batched and single runs then agree exactly, so tests compare outputs bit for bit."""
    from nanovllm import LLM

    return LLM(str(tiny_model), dtype="float64", max_model_len=512, num_kvcache_blocks=256,
               kvcache_block_size=16, max_num_seqs=64)
