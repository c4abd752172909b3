"""Backend names of the quantized-weight kernels, declared so that presets (configs/kernels/int4.yaml ...) and
kernel tables may name them wherever those kernels are not installed: resolution then falls back to the
native op, which reads every weight format. The kernels' own registration replaces each declaration."""

from nanovllm.ops.registry import declare_backend
from nanovllm.quant.weights import FORMATS

# weight-only quantized GEMV/GEMM kernels: `linear` and every site that reads a dense layer's weights (MoE experts stay
# dense, so `moe` has none)
TRITON_QUANT_OPS = ("linear", "norm_qkv", "attn_out", "mlp", "decode_layer", "lm_head_sample")

for _op in TRITON_QUANT_OPS:
    declare_backend(_op, "triton_quant", "the Triton quantized-weight kernels are not installed", FORMATS)
# W8A8: fp8 weights times fp8 activations with per-token scales computed on the fly
declare_backend("linear", "fp8_w8a8", "the FP8 W8A8 kernel is not installed", ("fp8",))
