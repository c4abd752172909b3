"""Which Hugging Face tensor names are linear weights (the ones a checkpoint may hold quantized)."""

from __future__ import annotations


def is_linear_weight(hf_name: str) -> bool:
    """Projection weights (attention, MLP, experts) and lm_head; not embeddings, norms or the router."""
    return hf_name.endswith("_proj.weight") or hf_name == "lm_head.weight"
