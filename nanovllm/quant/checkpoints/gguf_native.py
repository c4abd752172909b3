"""GGUF files read without dequantizing: every linear weight of a natively read block type becomes one
QuantizedWeight (gguf_blocks.py), every other tensor (embeddings, norms, the router, F32/F16/BF16 tensors,
block types not read natively) a dense float32 tensor, all under their Hugging Face names (gguf_names.py,
the same mapping the dequantizing conversion uses)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from nanovllm.checkpoints.gguf_names import dense_tensor, gguf_entries
from nanovllm.quant.checkpoints.gguf_blocks import NATIVE_TYPES, repack
from nanovllm.quant.checkpoints.names import is_linear_weight


def gguf_file(path) -> Path | None:
    """The .gguf file `path` names: the file itself or the one .gguf file in a folder; None if there is none."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    files = [f for f in sorted(path.glob("*.gguf")) if f.exists()] if path.is_dir() else []  # no dangling links
    if len(files) > 1:
        raise ValueError(f"{str(path)!r} holds several .gguf files; pass one of them: "
                         f"{', '.join(f.name for f in files)}")
    return files[0] if files else None


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int):
    """A GGUFReader (a memory map; parsing the metadata takes seconds for large vocabularies), kept for the
    formats-then-tensors sequence of a load."""
    from gguf import GGUFReader

    return GGUFReader(path)


def _reader_and_config(path, hf_config):
    from nanovllm.checkpoints.gguf_convert import hf_config as config_from_metadata

    file = gguf_file(path)
    if file is None:
        raise FileNotFoundError(f"{str(path)!r} is neither a .gguf file nor a folder holding one")
    file = file.resolve()
    reader = _open(str(file), file.stat().st_mtime_ns)
    arch = reader.fields["general.architecture"].contents()
    if hf_config is None:
        hf_config, arch = config_from_metadata(reader)
    return reader, arch, hf_config


def _native(entry) -> str | None:
    """The weight format the entry is read in, or None when it comes out dense."""
    fmt = NATIVE_TYPES.get(entry.tensor.tensor_type.name)
    return fmt if fmt is not None and is_linear_weight(entry.hf_name) else None


def weight_formats(path, hf_config=None) -> dict[str, str]:
    reader, arch, config = _reader_and_config(path, hf_config)
    return {e.hf_name: fmt for e in gguf_entries(reader, arch, config) if (fmt := _native(e)) is not None}


def quantized_tensors(path, hf_config=None, dtype: torch.dtype = torch.bfloat16):
    """(HF name, QuantizedWeight | float32 tensor) for every tensor of the file."""
    from gguf.quants import dequantize

    reader, arch, config = _reader_and_config(path, hf_config)
    for entry in gguf_entries(reader, arch, config):
        t = entry.tensor
        data = t.data if entry.expert is None else t.data[entry.expert]
        fmt = _native(entry)
        if fmt is not None:
            value = repack(data, t.tensor_type.name, int(t.shape[0]), dtype)
            if entry.row_order is not None:
                value = value.map_rows(_rows_in_order(entry.row_order))
        else:
            value = dense_tensor(entry, dequantize(data, t.tensor_type))
        yield entry.hf_name, value


def _rows_in_order(order):
    index = torch.from_numpy(order)
    return lambda rows: rows.index_select(0, index)
