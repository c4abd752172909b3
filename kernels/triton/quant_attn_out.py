"""Backend `triton_quant` of site `attn_out` (O projection + residual add + post-attention RMSNorm) for decode
over a quantized O projection: the quantized GEMV writes fp32 partial sums, then the dense backend's row
kernel (attn_out.py) sums them, adds the residual and norms the row."""

from __future__ import annotations

import torch
from torch.library import triton_op

from nanovllm.ops.plugins import load_builtin, load_sibling
from nanovllm.ops.workspace import workspace
from nanovllm.quant.weights import is_quantized

qcore = load_sibling(__file__, "_quant_core")
dense = load_builtin("triton/attn_out")


@triton_op("nanovllm_triton::qgemv_add_rms_norm", mutates_args=())
def qgemv_add_rms_norm(o: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                       perm: torch.Tensor | None, fmt: str, group: int, residual: torch.Tensor, norm_w: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(o @ W.T + residual), o @ W.T + residual) for a quantized W and at most MAX_M rows."""
    o = o if o.stride(-1) == 1 else o.contiguous()
    m, k = o.shape
    qw = qcore.qw_of(fmt, qweight, scale, offset, perm, group, k)
    n = qw.n

    def run(cfg, w):
        ws = workspace("gemv_split_k", (cfg.SPLIT_K, m, n), torch.float32, o)
        qcore.launch_qgemv(o, w, ws, cfg, partial=True)
        return dense.add_rms_norm_partials(ws, o, residual, norm_w, eps)

    return run(qcore.choose("qattn_out", o, qw, run), qw)


def attn_out(o, o_w, residual, norm_w, eps: float, *, parts):
    """Quantized O projection into fp32 partials, then residual add + RMSNorm per row (two kernels)."""
    if not is_quantized(o_w):
        return torch.ops.nanovllm_triton.gemv_add_rms_norm(o, o_w, residual, norm_w, eps)
    return torch.ops.nanovllm_triton.qgemv_add_rms_norm(o, *qcore.weight_args(o_w), residual, norm_w, eps)


qcore.register_quant_site("attn_out", attn_out, check=dense.check_attn_out)
