"""Shared pieces of the FlashInfer plugins (a `_` file: the plugin loader skips it; the plugins load it by path).

FlashInfer is imported lazily, inside functions, so the plugins load (and list their backends) on machines
without it; `unavailable()` is their `needs` hook. Attention goes through one torch custom op whose body
runs whatever the current step's plan hook installed under a string key: the wrappers (Python objects)
never cross the op boundary, so torch.compile(fullgraph) sees a plain op, and a CUDA graph records the
kernels of the wrapper planned for its batch size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from nanovllm.ops.workspace import pool

DTYPES = (torch.bfloat16, torch.float16)
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace (split-KV partial results)
PREFILL_BACKEND = "fa2"  # fa3 would cost another multi-minute JIT; fa2 is also the tensor-core decode kernel

# key -> run(q, k_cache, v_cache, scale) -> out, installed by plan hooks once per step, outside any graph.
RUNNERS: dict[str, Callable] = {}


@functools.cache
def unavailable() -> str | None:
    """Why FlashInfer cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing on import
        return f"flashinfer not importable ({type(e).__name__}: {e})"
    return None


SUPPORT = dict(devices=("cuda",), dtypes=DTYPES, needs=unavailable)
# The attention backends read a model-dtype cache only: FlashInfer's fp8 KV path takes one k_scale/v_scale per
# call, not the per-KV-head scales of an fp8 cache here (nanovllm/ops/kv_quant.py), so with kv_cache_dtype=fp8
# they are passed over (auto) or fall back to the native op, which says so.
ATTENTION_SUPPORT = dict(SUPPORT, kv_dtypes=("auto",))


def cold(target) -> str | None:
    """The attention backends' `cold` hook (Impl.cold): see _warm.py."""
    from nanovllm.ops.plugins import load_sibling

    return load_sibling(__file__, "_warm").cold(target)


def check_head_dim(shapes: dict) -> str | None:
    """head_dim in {64, 128, 256}, whole GQA groups"""
    if shapes.get("head_dim", 128) not in (64, 128, 256):
        return f"head_dim {shapes['head_dim']} not in (64, 128, 256)"
    heads, kv = shapes.get("heads"), shapes.get("kv_heads")
    if heads and kv and heads % kv:
        return f"{heads} query heads are not a multiple of {kv} KV heads"
    return None


def device_of(device) -> torch.device:
    device = torch.device(device)
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def workspace(device) -> torch.Tensor:
    """One float workspace per device, shared by every wrapper (their runs are serialized on the stream), from
    the engine's workspace pool; held: the wrappers keep it."""
    return pool(device_of(device)).request("flashinfer_float", (WORKSPACE_BYTES,), torch.uint8, held="process")


def page_table(seq_lens: np.ndarray, block_tables: np.ndarray, page_size: int):
    """FlashInfer's paged-KV description of a step, as int32 CPU tensors: (indptr, indices, last_page_len).

    Pages come from seq_lens, not from the block-table width: a request may hold more blocks than its
    computed tokens fill (chunked prefill allocates ahead).
    """
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    pages = (seq_lens + page_size - 1) // page_size
    indptr = np.zeros(len(pages) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    used = np.arange(block_tables.shape[1])[None, :] < pages[:, None]
    indices = np.ascontiguousarray(block_tables[used], dtype=np.int32)
    last = (seq_lens - (pages - 1) * page_size).astype(np.int32)
    return torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last)


def key(prefix: str, window: int, softcap: float) -> str:
    return f"{prefix}:{int(window)}:{float(softcap)}"


def window_left(window: int) -> int:
    """HF: a key is visible when q_pos - k_pos < window; FlashInfer: when q_pos - k_pos <= window_left."""
    return window - 1 if window > 0 else -1


def q_scale(scale: float, head_dim: int) -> float | None:
    """Wrappers are planned with the default 1/sqrt(head_dim) (a plan hook does not know the layer's scale);
    `q_scale` multiplies it at run time, so a model with another scale still gets the right one."""
    ratio = scale * head_dim ** 0.5
    return None if abs(ratio - 1.0) < 1e-6 else ratio


def wrapper_runner(wrapper, head_dim: int) -> Callable:
    """A runner for a BatchDecode/BatchPrefill wrapper planned this step."""

    def run(q, k_cache, v_cache, scale):
        out = q.new_empty(q.shape)
        return wrapper.run(q, (k_cache, v_cache), q_scale=q_scale(scale, head_dim), out=out)

    return run


def install(meta, name: str, runner: Callable, state) -> None:
    RUNNERS[name] = runner
    meta.plans[name] = state


def forget(names) -> None:
    """Drop plans this step does not make, so a stale plan is never run by mistake."""
    for name in names:
        RUNNERS.pop(name, None)


@torch.library.custom_op("nanovllm_fi::attention", mutates_args=())
def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: str,
              scale: float) -> torch.Tensor:
    run = RUNNERS.get(plan)
    if run is None:
        raise RuntimeError(f"no FlashInfer plan {plan!r} for this step (planned: {sorted(RUNNERS)}); the op's plan "
                           "hook must run before the forward pass (ModelRunner.prepare calls it)")
    return run(q.contiguous(), k_cache, v_cache, scale)


@attention.register_fake
def _(q, k_cache, v_cache, plan, scale):
    return q.new_empty(q.shape)
