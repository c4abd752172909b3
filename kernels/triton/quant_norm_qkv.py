"""Backend `triton_quant` of site `norm_qkv`: RMSNorm fused into the quantized QKV GEMV's x loads, as the
dense `triton` backend does it (norm_qkv.py): x is normed on the fly, 1/rms scales the outputs at the end."""

from __future__ import annotations

from nanovllm.ops.plugins import load_sibling

qcore = load_sibling(__file__, "_quant_core")


def norm_qkv(x, norm_w, qkv_w, qkv_b, eps: float, *, parts):
    """linear(rms_norm(x, norm_w, eps), qkv_w, qkv_b) in one kernel over the quantized weight."""
    return qcore.gemv(x, qkv_w, qkv_b, None, norm_w, eps)


qcore.register_quant_site("norm_qkv", norm_qkv)
