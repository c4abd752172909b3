"""attention_decode backend `flashinfer_cascade`: two-level cascade attention for decode steps whose requests
share a cached prefix (a system prompt): the shared pages are read once for the whole batch, not once per
request.

The plan hook looks for a leading run of block ids common to every request of the step (the prefix cache
hands out the same blocks for the same prefix). With at least CASCADE_MIN_BLOCKS such blocks and
CASCADE_MIN_REQUESTS requests it plans two levels, as MultiLevelCascadeAttentionWrapper does: level 0, all
queries against the shared pages (one non-causal "prefill" of batch 1), level 1, each query against its own
remaining pages (the plain decode wrapper); merge_state_in_place joins the two by their log-sum-exp. The
levels are written out rather than taken from MultiLevelCascadeAttentionWrapper so that level 0 uses the
fa2 prefill kernel (that wrapper picks fa3 on Hopper: another multi-minute JIT) and level 1 the same decode
kernel as `flashinfer`. Otherwise (no shared prefix, a sliding window, a CUDA-graph step, whose captured
kernels cannot change from step to step) it plans plain decode.
"""

from __future__ import annotations

import numpy as np
import torch

from nanovllm.ops import register_impl
from nanovllm.ops.plugins import load_sibling

common, planning = load_sibling(__file__, "_common"), load_sibling(__file__, "_decode")
BACKEND = "flashinfer_cascade"
CASCADE_MIN_BLOCKS = 8     # 128 tokens at block size 16: below this the extra kernel and merge cost more than saved
CASCADE_MIN_REQUESTS = 4   # fewer requests re-read the prefix few times anyway


def shared_prefix_blocks(block_tables: np.ndarray, pages: np.ndarray) -> int:
    """Leading block ids common to every row, leaving each request at least one page of its own."""
    limit = int(pages.min()) - 1
    if limit <= 0 or len(block_tables) < 2:
        return 0
    lead = block_tables[:, :limit]
    same = (lead == lead[:1]).all(axis=0)
    return limit if same.all() else int(same.argmin())


class CascadePlanner:
    def __init__(self):
        self.decode = planning.DecodePlanner(BACKEND)  # level 1, and the plain fallback
        self.shared: dict[tuple, object] = {}          # level-0 prefill wrappers per (device, softcap)
        self.last_shared_blocks = 0                    # what the last decode step used (tests, benchmarks)

    def shared_wrapper(self, ctx):
        device = common.device_of(ctx.device)
        k = (device, ctx.softcap)
        if k not in self.shared:
            from flashinfer import BatchPrefillWithPagedKVCacheWrapper

            self.shared[k] = BatchPrefillWithPagedKVCacheWrapper(common.workspace(device), "NHD",
                                                                 backend=common.PREFILL_BACKEND)
        return self.shared[k]

    def __call__(self, meta, ctx) -> None:
        """The plan hook: once per step, outside any graph."""
        if not meta.is_decode:
            common.forget(self.decode.keys(ctx))
            return
        host, bs = meta.host, ctx.page_size
        seq_lens, tables = np.asarray(host["seq_lens"]), host["block_tables"]
        n = 0
        if meta.graph_batch is None and len(seq_lens) >= CASCADE_MIN_REQUESTS:
            n = shared_prefix_blocks(tables, (seq_lens + bs - 1) // bs)
        self.last_shared_blocks = n = n if n >= CASCADE_MIN_BLOCKS else 0
        table = self.decode.table(meta, ctx)
        if n:
            unique = common.page_table(seq_lens - n * bs, tables[:, n:], bs)
            shared = self.shared_wrapper(ctx)
            shared.plan(torch.tensor([0, len(seq_lens)], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32),
                        torch.from_numpy(tables[0, :n].astype(np.int32)), torch.tensor([bs], dtype=torch.int32),
                        ctx.num_qo_heads, ctx.num_kv_heads, ctx.head_dim, bs, causal=False,
                        logits_soft_cap=ctx.softcap or None, q_data_type=ctx.dtype, kv_data_type=ctx.dtype)
        for window in ctx.windows:
            if not n or window > 0:  # a window cuts into the prefix per query: no shared level
                self.decode.plan_window(meta, ctx, window, table)
                continue
            self.decode.plan_window(meta, ctx, window, unique)
            name = common.key(BACKEND, window, ctx.softcap)
            suffix = self.decode.wrapper(ctx, window, None)
            common.install(meta, name, cascade_runner(shared, suffix, ctx.head_dim), (shared, suffix))


def cascade_runner(shared, suffix, head_dim: int):
    def run(q, k_cache, v_cache, scale):
        from flashinfer import merge_state_in_place

        qs = common.q_scale(scale, head_dim)
        out, lse = suffix.run(q, (k_cache, v_cache), q_scale=qs, return_lse=True)
        out_shared, lse_shared = shared.run(q, (k_cache, v_cache), q_scale=qs, return_lse=True)
        merge_state_in_place(out, lse, out_shared, lse_shared)
        return out

    return run


@register_impl("attention_decode", BACKEND, check=common.check_head_dim, plan=CascadePlanner(),
              **common.ATTENTION_SUPPORT)
def cascade_decode(q, k_cache, v_cache, meta, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    return torch.ops.nanovllm_fi.attention(q, k_cache, v_cache, common.key(BACKEND, window, softcap), scale)
