"""Backend `triton_chain` of site `decode_layer` (in `all_fused`): a decode step of a pre-norm SiLU layer as
five launches (six with the attention's merge), one fewer than its four sites in a row.

The sites hand each other normed activations, so `attn_out` needs a launch of its own for the post-attention
RMSNorm (the norm needs the whole row, which no GEMV program has). Here that norm moves into the gate/up
GEMV's prologue, as `norm_qkv` does for the input norm: every program recomputes the row's 1/rms from the
residual stream while it streams its weights.
1. RMSNorm + QKV GEMV; 2. q/k norm + RoPE + KV write + split-KV attention (+ merge); 3. O projection +
residual; 4. RMSNorm + gate/up GEMV + SiLU * up (gate/up rows interleaved, as the `mlp` site stores them);
5. down projection + residual.
With 2 to MAX_M rows (small batches, a verify step's rows) the two RMSNorms run as kernels of their own before
their GEMVs (_gemv_core.norm_apart); steps of more rows run the layer's sites.
"""

from __future__ import annotations

import torch

from nanovllm.ops import kv_quant
from nanovllm.ops.plugins import load_sibling
from nanovllm.ops.registry import declare_kv_dtypes

core = load_sibling(__file__, "_gemv_core")
attn = load_sibling(__file__, "_decode_core")


def decode_layer(x, weights, settings, positions, cos_sin, k_cache, v_cache, meta, kv_scales=None, *, parts):
    """The layer's decode step in five GEMV / attention launches (see the module docstring); weights: a
    LayerWeights, settings: an AttentionSettings (nanovllm/ops/sites.py); kv_scales: an fp8 cache's scales."""
    ops, w, s = torch.ops.nanovllm_triton, weights, settings
    kv_heads, head_dim = k_cache.shape[-2:]
    kv = kv_heads * head_dim
    eps = float(s.eps)
    qkv = ops.gemv(x, w.qkv_w, w.qkv_b, None, w.input_norm, eps)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv.split((w.qkv_w.shape[0] - 2 * kv, kv, kv), dim=-1))
    o = attn.rope_attention(q, k, v, w.q_norm_w, w.k_norm_w, eps, positions, cos_sin, k_cache, v_cache, meta,
                            s.scale, s.window, s.softcap, kv_scales)
    x = ops.gemv(o.flatten(1), w.o_w, None, x, None, 0.0)
    act = ops.gate_up_silu(x, w.gate_up_w, w.post_norm, eps)
    return ops.gemv(act, w.down_w, None, x, None, 0.0)


# more rows than a GEMV takes (register_site's default): the layer's sites, as resolved
core.register_site("decode_layer", decode_layer, check=attn.check_rope_attention, backend="triton_chain",
                   layouts={"gate_up_w": core.interleave_gate_up})
declare_kv_dtypes("decode_layer", "triton_chain", kv_quant.KV_CACHE_DTYPES)
