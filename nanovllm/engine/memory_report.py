"""Where the engine's device memory goes: weights, KV cache, activations (the warm-up's peak), kernel
workspaces, and on CUDA the rest of what the allocator holds (CUDA-graph pools, step buffers, model buffers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from nanovllm.quant.weights import QuantizedWeight

GIB = 2**30


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether t lives on `device` ("cuda" meaning any CUDA device's index)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _unique_bytes(tensors, device: torch.device) -> int:
    """Bytes of the distinct tensors on `device` (a tied weight counts once; weights kept on the host do not)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not _on(t, device):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def weight_tensors(model: torch.nn.Module):
    """The model's weights: its parameters and the stored tensors of its quantized weights."""
    yield from model.parameters()
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            yield from module.buffers(recurse=False)


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int | None  # the warm-up's peak; None when no warm-up measured it (CPU, fixed KV blocks)
    workspace_bytes: int
    other_bytes: int | None  # CUDA: allocated bytes outside the four above; None elsewhere
    workspaces: dict[str, int] = field(default_factory=dict)  # bytes per workspace name

    @classmethod
    def of(cls, runner) -> MemoryReport:
        """The report of a ModelRunner whose KV cache is allocated (read at the end of its init)."""
        device = runner.device
        weights = _unique_bytes(weight_tensors(runner.model), device)
        kv = sum(t.numel() * t.element_size() for pair in runner.kv_cache for t in pair)
        pool = runner.workspaces
        other = None
        if device.type == "cuda":
            other = torch.cuda.memory_allocated(device) - weights - kv - pool.nbytes
        return cls(weights, kv, runner.activation_bytes, pool.nbytes, other, pool.sizes())

    def as_dict(self) -> dict:
        """JSON-ready: the byte counts (None where not measured) and the per-workspace sizes."""
        return asdict(self)

    def gauges(self) -> dict[str, int]:
        """Bytes by kind, for metrics: the kinds that were measured."""
        kinds = {"weights": self.weights_bytes, "kv_cache": self.kv_cache_bytes,
                 "activations": self.activation_bytes, "workspace": self.workspace_bytes, "other": self.other_bytes}
        return {k: v for k, v in kinds.items() if v is not None}

    @property
    def summary(self) -> str:
        """One line for logs and the run's output."""
        labels = {"kv_cache": "KV cache", "activations": "activations (warm-up peak)"}
        parts = [f"{labels.get(kind, kind)} {v / GIB:.3f} GiB" for kind, v in self.gauges().items()]
        return "Memory: " + ", ".join(parts)
