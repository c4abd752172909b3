"""Backend `auto`: for each op, the fastest validated backend that can serve the device, dtype and shapes.

`RANKING` lists, per device type and op, the backends to try, fastest first, as measured end to end
(benchmarks/RESULTS.md has the numbers and commands). The first one that is registered, supports the
target and is not cold (a JIT build would block the first step; see Impl.cold) wins; the native op
closes every list. Ops and devices without a list run natively: on the CPU every op does.

For a layer with quantized weights, the weight-reading ops try `QUANT_RANKING` first (backends that read
the fp8/int8/int4 formats), then the dense list, whose backends the format check passes over.
"""

from __future__ import annotations

from nanovllm.ops.registry import NATIVE, Target, get_op, reads_weights

_FUSED = ("triton",)

RANKING: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {
        # a decode step of up to 16 rows: each layer as one chain of five launches over the sites below
        "decode_layer": ("triton_chain",),
        # q/k norm + RoPE + KV write inside the decode attention kernel
        "rope_decode_attention": _FUSED,
        "attention_decode": ("triton", "flashinfer", "sdpa"),
        "attention_prefill": ("flashinfer", "sdpa"),
        # GEMV-shaped sites with their norms, activations and residual adds fused in
        "norm_qkv": _FUSED, "qk_norm_rope": _FUSED, "attn_out": _FUSED, "mlp": _FUSED, "lm_head_sample": _FUSED,
        "moe": _FUSED,
        # the parts that steps of more rows (prefill, large batches) run
        "linear": _FUSED, "rms_norm": _FUSED, "add_rms_norm": _FUSED, "silu_and_mul": _FUSED, "sample": _FUSED,
        # a verify step's bookkeeping and the n-gram proposer's lookup: one launch each, not some twenty
        "verify_layout": _FUSED, "verify_accept": _FUSED, "ngram_lookup": _FUSED,
    },
}


_QUANT = ("triton_quant",)

# weight-only quantized kernels: the Triton GEMV/GEMM that read fp8/int8/int4 weights and their scales
QUANT_RANKING: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {op: _QUANT for op in ("linear", "norm_qkv", "attn_out", "mlp", "decode_layer", "lm_head_sample")},
}


def ranking(op: str, target: Target) -> tuple[str, ...]:
    """The backends `auto` tries for `op` on `target`, fastest first."""
    dense = RANKING.get(target.device, {}).get(op, ())
    if not (target.quantized and reads_weights(op)):
        return dense
    quant = QUANT_RANKING.get(target.device, {}).get(op, ())
    return quant + tuple(b for b in dense if b not in quant)


def choose(op: str, target: Target) -> tuple[str, list[str]]:
    """(backend, why each faster one was passed over) for `op` on `target`: the first ranked backend that
    can serve it, else the native op."""
    passed = []
    for backend in ranking(op, target):
        impl = get_op(op).impls.get(backend)
        if impl is None:
            passed.append(f"{backend}: not installed")
            continue
        why = impl.support.reason_unsupported(target.device, target.dtype, target.shapes, target.weight_format,
                                              target.kv_dtype)
        if why is None and impl.cold is not None:
            why = impl.cold(target)
        if why is None:
            return backend, passed
        passed.append(f"{backend}: {why}")
    return NATIVE, passed
