"""Planning of FlashInfer's BatchDecodeWithPagedKVCacheWrapper, shared by the `flashinfer*` decode backends.

Eager steps reuse one wrapper per (device, window, softcap). A step that replays (or captures) a CUDA graph
of batch size B (`meta.graph_batch`) uses a wrapper built with use_cuda_graph=True and fixed-size buffers,
kept per (device, B, window, softcap): plan() copies the step's page table into those buffers outside the
graph, and the graph's kernels read them.
"""

from __future__ import annotations

import torch

from nanovllm.ops.plugins import load_sibling

common = load_sibling(__file__, "_common")

# Tensor cores (the prefill kernel run as decode) pay off when a KV head serves many query heads; vLLM and
# SGLang switch at a group of 4+. `flashinfer_tc` forces them; benchmarks/fi_micro.py measures both.
TENSOR_CORE_MIN_GROUP = 4


class DecodePlanner:
    def __init__(self, prefix: str, tensor_cores: bool | None = None):
        self.prefix, self.tensor_cores = prefix, tensor_cores
        self.wrappers: dict[tuple, object] = {}

    def keys(self, ctx) -> list[str]:
        return [common.key(self.prefix, w, ctx.softcap) for w in ctx.windows]

    def use_tensor_cores(self, ctx) -> bool:
        if self.tensor_cores is not None:
            return self.tensor_cores
        return ctx.num_qo_heads // ctx.num_kv_heads >= TENSOR_CORE_MIN_GROUP

    def wrapper(self, ctx, window: int, graph_batch: int | None):
        device = common.device_of(ctx.device)
        tc, pages_per_seq = self.use_tensor_cores(ctx), -(-ctx.max_model_len // ctx.page_size)
        # The planner outlives engines (one per process): a wrapper fits only an engine of the same kernel
        # choice and page-table size.
        k = (device, graph_batch, window, ctx.softcap, tc, pages_per_seq)
        if k not in self.wrappers:
            from flashinfer import BatchDecodeWithPagedKVCacheWrapper

            if graph_batch is None:
                w = BatchDecodeWithPagedKVCacheWrapper(common.workspace(device), "NHD", use_tensor_cores=tc)
            else:
                i32 = dict(dtype=torch.int32, device=device)
                w = BatchDecodeWithPagedKVCacheWrapper(
                    common.workspace(device), "NHD", use_cuda_graph=True, use_tensor_cores=tc,
                    paged_kv_indptr_buffer=torch.zeros(graph_batch + 1, **i32),
                    paged_kv_indices_buffer=torch.zeros(graph_batch * pages_per_seq, **i32),
                    paged_kv_last_page_len_buffer=torch.ones(graph_batch, **i32))
            self.wrappers[k] = w
        return self.wrappers[k]

    def plan_window(self, meta, ctx, window: int, table) -> None:
        """Plan one window's wrapper on a page table (indptr, indices, last_page_len) and install its runner."""
        w = self.wrapper(ctx, window, meta.graph_batch)
        w.plan(*table, ctx.num_qo_heads, ctx.num_kv_heads, ctx.head_dim, ctx.page_size,
               window_left=common.window_left(window), logits_soft_cap=ctx.softcap or None,
               q_data_type=ctx.dtype, kv_data_type=ctx.dtype)
        common.install(meta, common.key(self.prefix, window, ctx.softcap), common.wrapper_runner(w, ctx.head_dim), w)

    def table(self, meta, ctx):
        host = meta.host
        rows = len(host["seq_lens"])
        if meta.graph_batch is not None and rows != meta.graph_batch:
            raise ValueError(f"graph step of batch {meta.graph_batch} has {rows} rows in meta.host; the model "
                             "runner must pad host arrays to the graph batch (seq_len 1, the scratch block)")
        return common.page_table(host["seq_lens"], host["block_tables"], ctx.page_size)

    def __call__(self, meta, ctx) -> None:
        """The plan hook: once per step, outside any graph."""
        if not meta.is_decode:
            common.forget(self.keys(ctx))
            return
        table = self.table(meta, ctx)
        for window in ctx.windows:
            self.plan_window(meta, ctx, window, table)
