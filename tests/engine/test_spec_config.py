"""speculative_config in vLLM's shape (LLM kwargs, Hydra `engine.speculative_config.*`), its checks, the
proposer registry and plugins, and prompt lookup's matching."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from nanovllm.config import EngineConfig, SpeculativeConfig
from nanovllm.engine.spec import PROPOSERS, Proposer, make_proposer
from nanovllm.engine.spec.ngram import NgramIndex
from nanovllm.ops.verify_ops import ngram_lookup


def test_dict_and_defaults():
    c = EngineConfig(device="cpu", speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                       "prompt_lookup_max": 5, "prompt_lookup_min": 2})
    assert c.speculative_config == SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=5)
    assert not EngineConfig(device="cpu").speculative_config.enabled
    assert not EngineConfig(device="cpu", speculative_config=None).speculative_config.enabled


@pytest.mark.parametrize("bad, message", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be >= 1"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "draft_model"}, 'needs "model"'),
    ({"method": "ngram", "max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"method": "ngram", "lookahead": 2}, "unknown speculative_config key"),
])
def test_bad_config(bad, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(device="cpu", speculative_config=bad)


def test_hydra_overrides():
    from nanovllm.bench import presets

    cfg = presets.compose_config("baseline", ["model=tiny", "device=cpu", "engine.speculative_config.method=ngram",
                                              "engine.speculative_config.num_speculative_tokens=3"])
    assert cfg.engine.speculative_config.method == "ngram"
    assert cfg.engine.speculative_config.num_speculative_tokens == 3
    with pytest.raises(Exception, match="lookahead"):
        presets.compose_config("baseline", ["+engine.speculative_config.lookahead=2"])


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown speculative_config method 'medusa'; registered: .*ngram"):
        make_proposer(SpeculativeConfig(method="medusa"), engine=None)


def test_plugin_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_heads.py").write_text(
        "from nanovllm.engine.spec import Proposer, register_proposer\n\n"
        "@register_proposer('repeat_last')\n"
        "class RepeatLast(Proposer):\n"
        "    def propose(self, seqs, max_tokens):\n"
        "        return [[s.token_ids[-1]] * k for s, k in zip(seqs, max_tokens)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        proposer = make_proposer(SpeculativeConfig(method="my_heads:repeat_last"), engine=None)
        assert isinstance(proposer, Proposer) and "repeat_last" in PROPOSERS
    finally:
        PROPOSERS.pop("repeat_last", None)
        sys.modules.pop("my_heads", None)


def test_register_rejects_non_proposers():
    from nanovllm.engine.spec import register_proposer

    with pytest.raises(TypeError, match="must subclass"):
        register_proposer("x")(object)


@pytest.mark.parametrize("tokens, k, want", [
    ([1, 2, 3, 4, 1, 2], 3, [3, 4, 1]),         # suffix [1, 2] seen at the start
    ([1, 2, 3, 4, 1, 2], 1, [3]),
    ([5, 1, 2, 9, 1, 2, 7, 1, 2], 2, [7, 1]),   # the most recent earlier occurrence
    ([1, 2, 3, 4], 3, []),                      # no repeat
    ([7, 7], 3, []),                            # shorter than prompt_lookup_min + 1
    ([3, 1, 2, 8, 0, 1, 2, 9, 4, 0, 1, 2], 2, [9, 4]),  # longer match [0, 1, 2] wins over [1, 2]
])
def test_lookup(tokens, k, want):
    assert NgramIndex(2, 4).lookup(tokens, k) == want


def scan(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup by brute force: the latest earlier occurrence of the longest suffix n-gram."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i:i + n] == suffix]
        if starts:
            return tokens[starts[-1] + n:starts[-1] + n + k]
    return []


@pytest.mark.parametrize("n_min,n_max", [(1, 3), (2, 4)])
def test_index_grown_step_by_step_matches_a_full_scan(n_min, n_max):
    """The index extended with each step's new tokens (one, or a verify step's several) proposes what a scan
    of the whole sequence finds, on a small alphabet where n-grams repeat often."""
    rng = np.random.default_rng(n_min)
    tokens = rng.integers(0, 6, 20).tolist()
    index = NgramIndex(n_min, n_max)
    while len(tokens) < 200:
        assert index.lookup(tokens, 4) == scan(tokens, 4, n_min, n_max), len(tokens)
        tokens += rng.integers(0, 6, int(rng.integers(1, 5))).tolist()


@pytest.mark.parametrize("n_min,n_max", [(1, 3), (2, 4)])
def test_lookup_on_device_matches_a_full_scan(n_min, n_max):
    """The device lookup, a batch of rows of any length at once, proposes what a scan of each row's tokens finds,
    at most each row's cap (which may be under 0 or over k)."""
    rng = np.random.default_rng(n_max)
    b, width, k = 6, 48, 4
    for _ in range(30):
        history = torch.from_numpy(rng.integers(0, 4, (b, width)))
        lengths = torch.from_numpy(rng.integers(0, width + 1, b))
        caps = torch.from_numpy(rng.integers(-1, k + 3, b))
        drafts, counts = ngram_lookup(history, lengths, caps, k, n_min, n_max)
        for row, length, cap, d, c in zip(history.tolist(), lengths.tolist(), caps.tolist(), drafts, counts):
            assert d[:c].tolist() == scan(row[:length], max(0, min(k, cap)), n_min, n_max)
