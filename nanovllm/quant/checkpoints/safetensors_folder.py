"""The tensors of a Hugging Face folder's *.safetensors files (one file or shards), by name, read lazily."""

from __future__ import annotations

from pathlib import Path

import torch


class SafetensorsFolder:
    def __init__(self, path):
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{str(path)!r} holds no *.safetensors files")
        self._open = {f: safe_open(str(f), framework="pt") for f in files}
        self._file = {name: f for f, h in self._open.items() for name in h.keys()}  # noqa: SIM118

    def names(self) -> list[str]:
        """Every tensor name, file by file in each file's order."""
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def get(self, name: str) -> torch.Tensor:
        return self._open[self._file[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape from the header alone."""
        return tuple(self._open[self._file[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The header's dtype name: "F8_E4M3", "I32", "BF16", ..."""
        return self._open[self._file[name]].get_slice(name).get_dtype()
