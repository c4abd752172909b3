"""nano-vllm's model cache: folders written once, atomically, under $NANOVLLM_CACHE/models.

Writing happens in a temporary folder beside the final one and is renamed into place only when complete,
so an interrupted or concurrent writer never leaves a folder that looks usable.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("nanovllm.checkpoints")

STALE_PARTIAL_S = 24 * 3600


def cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else $NANOVLLM_CACHE, else ~/.cache/nanovllm."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("NANOVLLM_CACHE") or Path.home() / ".cache" / "nanovllm").expanduser()


def materialize_atomically(write: Callable[[Path], None], dest: Path, description: str) -> None:
    """Run `write` (which fills an existing empty folder with a Hugging Face folder) and move its result
    to `dest`, unless another process finished `dest` first. `dest` appears complete or not at all."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.parent / f".{dest.name}.lock"):
        if (dest / "config.json").is_file():  # another process finished while we waited
            return
        _remove_stale_partials(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            logger.info("writing model %r into %s (once): %s", dest.name, dest, description)
            write(tmp)
            if not (tmp / "config.json").is_file():
                raise RuntimeError(f"catalog entry {dest.name!r} wrote no config.json")
            # mkdtemp (and safetensors) create private files; the cache may be shared.
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                if f.is_file() and not f.is_symlink():  # a link's target is not the cache's to change
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
        if time.time() - p.stat().st_mtime > STALE_PARTIAL_S:
            shutil.rmtree(p, ignore_errors=True)
