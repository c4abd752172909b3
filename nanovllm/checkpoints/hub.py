"""Hugging Face Hub repos ("org/name") as model folders: the local Hugging Face cache first, else a download
of only the files the engine reads (through `huggingface_hub.snapshot_download`, which shows progress bars).

`HF_HUB_OFFLINE=1` limits this to the cache. A `revision` (branch, tag or commit) pins what is loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("nanovllm.checkpoints")

# What the engine reads from a repo: config, safetensors weights, tokenizer, generation defaults and the
# chat template. Other weights (*.bin, *.gguf, onnx, original/ folders) are never downloaded.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
]
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubModelError(FileNotFoundError):
    """A Hugging Face repo id that gives no model folder: not cached while offline, not found, gated, ..."""


def looks_like_repo_id(name: str) -> bool:
    """"org/name" as the Hub spells repo ids (not a path such as ./a/b or /a/b)."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser() / "hub"


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The folder of `repo_id` at `revision` (None: the default branch): the cached snapshot when it holds
    config.json and weights, else downloaded (or completed) into the Hugging Face cache. Offline, a cached
    snapshot is returned as it is."""
    cached = cached_snapshot(repo_id, revision)
    if cached is not None and (offline() or _complete(cached)):
        return cached
    if offline():
        raise HubModelError(
            f"model {_named(repo_id, revision)} is not a local folder, and HF_HUB_OFFLINE=1 allows only a Hugging "
            f"Face repo id present in the local Hugging Face cache ({hub_cache_dir()}); it is not there. Download "
            f"it once with network access (unset HF_HUB_OFFLINE), or pass the path of a model folder")
    return download(repo_id, revision)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of `repo_id` at `revision`, read without the network; None when not cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True))
    except Exception:  # not cached, or no refs/<revision>: look at the snapshot folders themselves
        pass
    snapshots = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if revision is not None:  # a commit hash names its snapshot folder
        return snapshots / revision if (snapshots / revision).is_dir() else None
    found = sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def download(repo_id: str, revision: str | None = None) -> Path:
    """snapshot_download of the files in ALLOW_PATTERNS; errors say what went wrong and what to do."""
    from huggingface_hub import errors, snapshot_download

    named = _named(repo_id, revision)
    logger.warning("downloading model %s from the Hugging Face Hub into %s (config, tokenizer and safetensors "
                   "weights only)", named, hub_cache_dir())
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(),
                                      allow_patterns=ALLOW_PATTERNS))
    except errors.GatedRepoError:
        raise HubModelError(f"model {named} is gated on the Hugging Face Hub: accept its terms at "
                            f"https://huggingface.co/{repo_id} and log in (`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise HubModelError(f"model {named} is neither a local folder nor a repo on the Hugging Face Hub (or it "
                            f"is private: log in with `hf auth login` or set HF_TOKEN); check the name, or pass a "
                            f"model folder, a .gguf file or a catalog name") from None
    except errors.RevisionNotFoundError:
        raise HubModelError(f"the Hugging Face repo {repo_id!r} has no revision {revision!r}; pass a branch, "
                            f"tag or commit of https://huggingface.co/{repo_id}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.HfHubHTTPError, OSError) as e:
        raise HubModelError(f"model {named} is not in the local Hugging Face cache ({hub_cache_dir()}) and could "
                            f"not be downloaded ({type(e).__name__}: {e}). Check the network connection (or "
                            f"HF_ENDPOINT / proxy settings), or pass the path of a model folder") from None
    if not (path / "config.json").is_file():
        raise HubModelError(f"the Hugging Face repo {named} has no config.json at its top level; it is not a "
                            f"transformers model nano-vllm can load")
    if not _has_weights(path):
        raise HubModelError(f"the Hugging Face repo {named} has no *.safetensors weights (nano-vllm loads "
                            f"safetensors only); convert the checkpoint, or pass a .gguf file")
    return path


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and _has_weights(folder)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _named(repo_id: str, revision: str | None) -> str:
    return repr(repo_id) + (f" (revision {revision!r})" if revision else "")
