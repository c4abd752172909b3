"""Arrival counters for the one-kernel merges of the experimental variants (onepass.py, persistent_layer.py):
the last program of a group to finish does the group's final step in the same kernel, instead of a second
launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def arrive_last(count_ptr, total):
    """True in the one program that arrives last of `total` at this counter. Every program's stores before
    its arrival are visible to the last one, which must read them with cache_modifier=".cg" (L1 is not
    coherent across SMs). The last one resets the counter, so a CUDA graph can replay the kernel."""
    tl.debug_barrier()  # all of this program's stores are issued before its arrival (release is cumulative)
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == total - 1
    if last:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    return last


NUM_COUNTERS = 1 << 16
_counters: dict = {}


def counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The device's zeroed int32 arrival counters for `arrive_last` (each kernel leaves them zeroed), or None
    where a one-pass kernel must not use them: too many programs, torch.compile tracing (a global buffer the
    op mutates), or a CUDA-graph capture before any eager call allocated them."""
    if needed > NUM_COUNTERS or torch.compiler.is_compiling():
        return None
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[device] = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]
