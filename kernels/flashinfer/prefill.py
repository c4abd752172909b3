"""attention_prefill on FlashInfer's BatchPrefillWithPagedKVCacheWrapper, backend `flashinfer`.

The new tokens' K/V are already in the paged cache (store_kv runs first), so one causal paged prefill
covers fresh prompts, prefix-cache hits and chunked prefill alike: FlashInfer places request i's
qo_len queries at the end of its kv_len keys, which is where our positions put them.
"""

from __future__ import annotations

import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

common = load_sibling(__file__, "_common")
PREFIX = "prefill"


class PrefillPlanner:
    plans_decode = False  # decode and verify steps are not its (they plan nothing here)

    def __init__(self):
        self.wrappers: dict[tuple, object] = {}

    def wrapper(self, ctx, window: int):
        device = common.device_of(ctx.device)
        k = (device, window, ctx.softcap)
        if k not in self.wrappers:
            from flashinfer import BatchPrefillWithPagedKVCacheWrapper

            self.wrappers[k] = BatchPrefillWithPagedKVCacheWrapper(common.workspace(device), "NHD",
                                                                   backend=common.PREFILL_BACKEND)
        return self.wrappers[k]

    def __call__(self, meta, ctx) -> None:
        """The plan hook: once per step, outside any graph."""
        keys = [common.key(PREFIX, w, ctx.softcap) for w in ctx.windows]
        if meta.is_decode:  # decode and verify steps run the decode attention
            common.forget(keys)
            return
        if meta.graph_batch is not None:
            raise NotImplementedError("flashinfer attention_prefill has no CUDA-graph wrapper; capture decode only")
        host = meta.host
        qo_indptr = torch.from_numpy(host["cu_seqlens_q"].astype("int32"))
        table = common.page_table(host["seq_lens"], host["block_tables"], ctx.page_size)
        for window, name in zip(ctx.windows, keys):
            w = self.wrapper(ctx, window)
            w.plan(qo_indptr, *table, ctx.num_qo_heads, ctx.num_kv_heads, ctx.head_dim, ctx.page_size, causal=True,
                   window_left=common.window_left(window), logits_soft_cap=ctx.softcap or None,
                   q_data_type=ctx.dtype, kv_data_type=ctx.dtype)
            common.install(meta, name, common.wrapper_runner(w, ctx.head_dim), w)


@register_impl("attention_prefill", "flashinfer", check=common.check_head_dim, plan=PrefillPlanner(),
               cold=common.cold, **common.ATTENTION_SUPPORT)
def prefill(q, k_cache, v_cache, meta, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    return torch.ops.nanovllm_fi.attention(q, k_cache, v_cache, common.key(PREFIX, window, softcap), scale)
