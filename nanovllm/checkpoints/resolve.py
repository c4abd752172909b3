"""`resolve_model(name)`: the local Hugging Face folder that `model=` names, fetched or written once.

A name is, in this order: a local folder with config.json (used as is); a .gguf file, or a folder holding
one (converted once into the cache); a catalog name (materialized once into the cache); a Hugging Face repo
id "org/name" (the local Hugging Face cache, else downloaded; `revision` pins a branch, tag or commit).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from nanovllm.checkpoints.cache import cache_root, materialize_atomically
from nanovllm.checkpoints.catalog import CATALOG, CatalogEntry
from nanovllm.checkpoints.hub import hub_snapshot, looks_like_repo_id

logger = logging.getLogger("nanovllm.checkpoints")

_noted: set[str] = set()  # catalog folders whose note was logged in this process


def resolve_model(name_or_path: str, cache_dir: Path | None = None, revision: str | None = None) -> Path:
    """A Hugging Face folder for `model=` (see the module docstring for what a name may be)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        _no_revision(name, revision)
        return path
    gguf = _gguf_in(path)
    if gguf is not None:
        _no_revision(name, revision)
        return _converted_gguf(gguf, cache_dir)
    entry = CATALOG.get(name)
    if entry is not None:
        _no_revision(name, revision)
        return _catalog_folder(name, entry, cache_dir)
    if not path.exists() and looks_like_repo_id(name):
        snapshot = hub_snapshot(name, revision)
        if not (snapshot / "config.json").is_file():
            raise FileNotFoundError(f"the Hugging Face repo {name!r} ({snapshot}) has no config.json")
        return snapshot
    what = "a folder without config.json" if path.is_dir() else "neither a folder nor a catalog name"
    raise FileNotFoundError(
        f"model {name!r} is {what}; expected a Hugging Face model folder containing config.json (and "
        f"*.safetensors), a .gguf file, a Hugging Face repo id (org/name: the local Hugging Face cache, else "
        f"downloaded), or one of the catalog names: {', '.join(sorted(CATALOG))}")


def _no_revision(name: str, revision: str | None) -> None:
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to Hugging Face repo ids; model {name!r} is a local "
                         f"folder, a .gguf file or a catalog name")


def _catalog_folder(name: str, entry: CatalogEntry, cache_dir: Path | None) -> Path:
    dest = cache_root(cache_dir) / "models" / entry.folder
    if not (dest / "config.json").is_file():
        materialize_atomically(entry.materialize, dest, entry.description)
    if entry.note and entry.folder not in _noted:
        _noted.add(entry.folder)
        logger.warning("model %r (%s): %s", name, dest, entry.note)
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
    from nanovllm.checkpoints.gguf_convert import gguf_to_hf

    gguf = gguf.resolve()
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_root(cache_dir) / "models" / f"gguf-{gguf.stem}-{key}"
    if not (dest / "config.json").is_file():
        materialize_atomically(lambda d: gguf_to_hf(gguf, d), dest, f"{gguf.name} dequantized")
    return dest
