"""Time one call of a function on the device.

CUDA: `launches` back-to-back calls captured in one CUDA graph, each call on the next
of several input copies, so that together the copies exceed L2 many times over and weights come from
HBM, not cache. Replaying the graph removes the host's launch cost, leaving the GPU's time per call.
If capture fails (a kernel that cannot be captured), the same calls are timed with CUDA events outside a
graph; on the CPU with perf_counter. The method used is returned with the time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from nanovllm.utils.cuda_graph import capture

LAUNCHES = 50
REPEATS = 7
L2_MULTIPLE = 4  # input copies together span this many L2 caches


def clone_args(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def l2_bytes(device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 << 20)


def num_copies(case_bytes: int, device, launches: int = LAUNCHES) -> int:
    if torch.device(device).type != "cuda":
        return 1
    return max(1, min(launches, math.ceil(L2_MULTIPLE * l2_bytes(device) / max(case_bytes, 1))))


def rotating(args: tuple, case_bytes: int, device, launches: int = LAUNCHES) -> list[tuple]:
    """The original inputs plus enough clones to rotate through (clones share non-tensor arguments)."""
    return [args] + [clone_args(args) for _ in range(num_copies(case_bytes, device, launches) - 1)]


def _cuda_graph(fn: Callable, arg_sets: list[tuple], launches: int, repeats: int) -> float:
    def warmup():
        for args in arg_sets[:2]:
            fn(*args)

    def launch_all():
        for i in range(launches):
            fn(*arg_sets[i % len(arg_sets)])

    graph, _ = capture(launch_all, warmup)
    graph.replay()
    return _events(graph.replay, repeats) / launches


def _events(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of `run()` by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _loop(fn: Callable, arg_sets: list[tuple], launches: int) -> Callable[[], None]:
    def run():
        for i in range(launches):
            fn(*arg_sets[i % len(arg_sets)])
    return run


def time_call(fn: Callable, arg_sets: list[tuple], device, launches: int = LAUNCHES,
              repeats: int = REPEATS, graphs: bool = True) -> tuple[float, str]:
    """(seconds per call, method) with method one of cuda_graph, cuda_events, cpu."""
    device = torch.device(device)
    if device.type == "cuda":
        if graphs:
            try:
                return _cuda_graph(fn, arg_sets, launches, repeats), "cuda_graph"
            except Exception as e:  # not capturable: time plain launches (host launch cost included)
                torch.cuda.synchronize()
                why = f" (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
        else:
            why = ""
        run = _loop(fn, arg_sets, launches)
        run()
        return _events(run, repeats) / launches, "cuda_events" + why
    run = _loop(fn, arg_sets, launches)
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / launches, "cpu"
