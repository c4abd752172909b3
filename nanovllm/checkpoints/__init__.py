"""Getting checkpoints: every `model=` name becomes a local Hugging Face folder (config.json, safetensors,
tokenizer) that nanovllm/models/ loads.

- resolve.py: `resolve_model(name, revision=None)`, the one entry point;
- catalog.py: named models (`default`, `tiny`, `smollm2-135m`, `gemma3-270m`);
- hub.py: Hugging Face repo ids, from the local cache or downloaded;
- gguf_convert.py: .gguf files converted to Hugging Face folders (keeping the file as model.gguf);
  gguf_names.py: GGUF tensor names -> HF names; pypi.py: GGUF files shipped in PyPI packages;
- random_weights.py: seeded random-weight folders for any architecture; cache.py: the write-once cache.
"""

from nanovllm.checkpoints.cache import cache_root
from nanovllm.checkpoints.catalog import CATALOG, RANDOM_NOTE, CatalogEntry
from nanovllm.checkpoints.hub import HubModelError
from nanovllm.checkpoints.pypi import MissingModelPackage
from nanovllm.checkpoints.random_weights import qwen3_config, write_random_checkpoint
from nanovllm.checkpoints.resolve import resolve_model

__all__ = ["CATALOG", "RANDOM_NOTE", "CatalogEntry", "HubModelError", "MissingModelPackage", "cache_root",
           "qwen3_config", "resolve_model", "write_random_checkpoint"]
