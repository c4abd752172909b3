"""Capturing a function into a CUDA graph, the way capture requires (shared by the Triton tuner and the bench)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture(fn: Callable[[], object], warmup: Callable[[], object] | None = None):
    """(CUDA graph of fn(), fn's static outputs). `warmup` (default: fn) runs first on a side stream, as
    capture requires: lazy initialization, JIT and autotuning stay outside the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (warmup or fn)()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
