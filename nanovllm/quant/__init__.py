"""Quantized weights: the container every format loads into (weights.py)."""

from nanovllm.quant.weights import FORMATS, QuantizedWeight, cat_rows, is_quantized

__all__ = ["FORMATS", "QuantizedWeight", "cat_rows", "is_quantized"]
