"""The tensors of a GPTQ- or AWQ-layout folder, where each quantized linear X is stored as `X.qweight` plus
sibling tensors (`X.qzeros`, `X.scales`, ...) that its format's repack turns into one QuantizedWeight."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from nanovllm.quant.checkpoints.safetensors_folder import SafetensorsFolder
from nanovllm.quant.weights import QuantizedWeight

QWEIGHT = ".qweight"


def repacked_tensors(path, method: str, siblings: tuple[str, ...], required: tuple[str, ...],
                     repack_one: Callable[[dict[str, torch.Tensor]], QuantizedWeight],
                     ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(HF name, tensor) for every tensor of the folder at `path`, except that each quantized linear X comes once,
    as (`X.weight`, repack_one(parts)), where parts maps ".qweight" and each present suffix of `siblings` to
    X's tensor; the siblings are not yielded on their own. Every suffix of `required` must be present, else a
    ValueError names the missing tensors."""
    folder = SafetensorsFolder(path)
    for name in folder.names():
        if name.endswith(siblings):
            continue
        if not name.endswith(QWEIGHT):
            yield name, folder.get(name)
            continue
        base = name.removesuffix(QWEIGHT)
        missing = [base + p for p in required if base + p not in folder]
        if missing:
            raise ValueError(f"{method} checkpoint {str(path)!r} lacks {', '.join(missing)}")
        parts = {p: folder.get(base + p) for p in (QWEIGHT, *siblings) if base + p in folder}
        yield base + ".weight", repack_one(parts)
