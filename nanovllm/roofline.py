"""Batch-1 decode roofline: every decoded token reads all weights once plus the KV cache of its context.

Bandwidths are per device name. Only numbers measured on the card belong in the table as "measured";
others are marked as datasheet-derived. A device not in the table gets a copy bandwidth measured at run
time (read + write bytes), which is a rougher stand-in for a pure weight read.
"""

from __future__ import annotations

import functools
import time

import torch

# (substring of torch.cuda.get_device_name, weight-read bytes/s, source); first match wins.
BANDWIDTHS: tuple[tuple[str, float, str], ...] = (
    ("H100 80GB HBM3", 3.12e12, "measured: lm_head GEMV, plain Triton kernel, H100 SXM (benchmarks/RESULTS.md)"),
    ("H100 SXM", 3.12e12, "measured: lm_head GEMV, plain Triton kernel, H100 SXM (benchmarks/RESULTS.md)"),
    ("H200", 4.3e12, "datasheet-derived: ~90% of 4.8 TB/s, not measured"),
)


def known_bandwidth(device_name: str) -> tuple[float, str] | None:
    for key, bw, source in BANDWIDTHS:
        if key in device_name:
            return bw, source
    return None


@functools.cache  # once per process: the jobs of a sweep share one roofline
def measure_copy_bandwidth(device: str, mib: int = 256, reps: int = 5) -> float:
    """Best-of-`reps` bytes/s of a device-local copy, counting both the bytes read and written."""
    device = torch.device(device)
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    dst.copy_(src)  # first touch: page faults / allocation off the clock
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def device_bandwidth(device_name: str, device: str | torch.device) -> tuple[float, str]:
    """(bytes/s, where the number comes from) for the roofline of this device."""
    known = known_bandwidth(device_name)
    if known is not None:
        return known
    mib = 256 if torch.device(device).type == "cpu" else 1024
    return measure_copy_bandwidth(str(device), mib), f"measured at run time: {mib} MiB copy (read + write)"


def bytes_per_token(weight_bytes: int, kv_bytes_per_token: int, context: int) -> int:
    return weight_bytes + kv_bytes_per_token * context


def roofline_tok_s(weight_bytes: int, kv_bytes_per_token: int, context: int, bandwidth: float) -> float:
    """Upper bound on batch-1 decode tok/s when every byte moves at `bandwidth`."""
    return bandwidth / bytes_per_token(weight_bytes, kv_bytes_per_token, context)
