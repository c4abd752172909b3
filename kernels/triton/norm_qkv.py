"""Backend `triton` of site `norm_qkv`: RMSNorm fused into the QKV GEMV's x loads.

Every program streams x once anyway: it multiplies x by the norm weight on the fly and accumulates the
row's sum of squares beside the dot product, then scales its outputs by 1/rms (the row scale factors out
of the dot product). The normed vector never touches memory and there is no prologue launch.
"""

from __future__ import annotations

import torch

from nanovllm.ops.plugins import load_sibling

core = load_sibling(__file__, "_gemv_core")


def norm_qkv(x, norm_w, qkv_w, qkv_b, eps: float, *, parts):
    """linear(rms_norm(x, norm_w, eps), qkv_w, qkv_b) in one kernel."""
    return torch.ops.nanovllm_triton.gemv(x, qkv_w, qkv_b, None, norm_w, eps)


core.register_site("norm_qkv", norm_qkv)
