"""What a loaded model's weights take: bytes held dense and quantized, and what they would take all dense."""

from __future__ import annotations

from collections import Counter

from torch import nn

from nanovllm.quant.weights import QuantizedWeight


def weight_stats(model: nn.Module) -> dict:
    """Bytes of the dense Parameters (a tied LM head once) and of the QuantizedWeights (values, scales, offsets),
    the logical parameter count, the quantized weights per format, and the bytes the quantized weights would take
    dense in the model's dtype (`dense_equivalent_bytes`: the whole model unquantized)."""
    params = {id(p): p for p in model.parameters()}.values()
    dense = sum(p.numel() * p.element_size() for p in params)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    qbytes = sum(w.nbytes() for w in quantized)
    qparams = sum(w.out_features * w.in_features for w in quantized)
    elem = next(iter(params)).element_size() if params else 2
    return dict(dense_bytes=dense, quantized_bytes=qbytes, num_params=sum(p.numel() for p in params) + qparams,
                formats=dict(Counter(w.format for w in quantized)), num_quantized=len(quantized),
                dense_equivalent_bytes=dense + qparams * elem)


def gib(n: int) -> str:
    """Bytes in GiB, MiB or KiB, whichever reads best."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def weights_line(stats: dict, quantization: str) -> str:
    """One line for the run's output: "weights 4.71 GiB (int4 (group 128, symmetric): 196 matrices 3.9 GiB,
    dense 0.81 GiB; 15.26 GiB unquantized)"; dense models just "weights 1.41 GiB (dense)"."""
    total = stats["dense_bytes"] + stats["quantized_bytes"]
    if not stats["num_quantized"]:
        return f"weights {gib(total)} (dense)"
    return (f"weights {gib(total)} ({quantization}: {stats['num_quantized']} matrices {gib(stats['quantized_bytes'])}"
            f", dense {gib(stats['dense_bytes'])}; {gib(stats['dense_equivalent_bytes'])} unquantized)")
