"""Backend `triton_quant` of site `decode_layer`: the dense `triton_chain` decode step (decode_chain.py) over a
layer's quantized weights, five launches (six with the attention's merge):
1. RMSNorm + quantized QKV GEMV; 2. q/k norm + RoPE + KV write + split-KV attention (the dense kernel);
3. quantized O projection + residual; 4. RMSNorm + quantized gate/up GEMV + SiLU * up (rows interleaved, as
the `triton_quant` mlp stores them); 5. quantized down projection + residual.
A weight the layer keeps dense runs the dense GEMV in its place. Steps of more than MAX_M rows run the
layer's sites.
"""

from __future__ import annotations

from nanovllm.ops import kv_quant
from nanovllm.ops.plugins import load_builtin, load_sibling
from nanovllm.ops.registry import declare_kv_dtypes

qcore = load_sibling(__file__, "_quant_core")
attn = load_sibling(__file__, "_decode_core")
qmlp = load_builtin("triton/quant_mlp")


def decode_layer(x, weights, settings, positions, cos_sin, k_cache, v_cache, meta, kv_scales=None, *, parts):
    """The layer's decode step in five GEMV / attention launches (see the module docstring); weights: a
    LayerWeights, settings: an AttentionSettings (nanovllm/ops/sites.py); kv_scales: an fp8 cache's scales."""
    w, s = weights, settings
    kv_heads, head_dim = k_cache.shape[-2:]
    kv = kv_heads * head_dim
    eps = float(s.eps)
    qkv = qcore.gemv(x, w.qkv_w, w.qkv_b, None, w.input_norm, eps)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv.split((w.qkv_w.shape[0] - 2 * kv, kv, kv), dim=-1))
    o = attn.rope_attention(q, k, v, w.q_norm_w, w.k_norm_w, eps, positions, cos_sin, k_cache, v_cache, meta,
                            s.scale, s.window, s.softcap, kv_scales)
    x = qcore.gemv(o.flatten(1), w.o_w, None, x)
    act = qmlp.gate_up_silu(x, w.gate_up_w, w.post_norm, eps)
    return qcore.gemv(act, w.down_w, None, x)


qcore.register_quant_site("decode_layer", decode_layer, check=attn.check_rope_attention,
                          layouts={"gate_up_w": qcore.interleave_gate_up})
declare_kv_dtypes("decode_layer", "triton_quant", kv_quant.KV_CACHE_DTYPES)
