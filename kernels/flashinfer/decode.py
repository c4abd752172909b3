"""attention_decode on FlashInfer's paged decode kernels: backends `flashinfer` (tensor cores only for GQA
groups of TENSOR_CORE_MIN_GROUP+) and `flashinfer_tc` (tensor cores always). CUDA-graph steps: see _decode.py."""

from __future__ import annotations

import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

common, planning = load_sibling(__file__, "_common"), load_sibling(__file__, "_decode")


def _register(backend: str, tensor_cores: bool | None) -> None:
    def decode(q, k_cache, v_cache, meta, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        return torch.ops.nanovllm_fi.attention(q, k_cache, v_cache, common.key(backend, window, softcap), scale)

    register_impl("attention_decode", backend, check=common.check_head_dim, cold=common.cold,
                  plan=planning.DecodePlanner(backend, tensor_cores), **common.ATTENTION_SUPPORT)(decode)


_register("flashinfer", None)
_register("flashinfer_tc", True)
