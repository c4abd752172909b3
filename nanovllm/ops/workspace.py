"""Kernel scratch memory (split-K and split-KV partials, FlashInfer's float workspace, sampling noise) from one
pool per device, sized while the engine warms up and fixed after.

`workspace(name, shape, dtype, like)` returns a tensor of `shape` viewing the buffer of workspace `name`
on `like`'s device. Each name keeps one buffer, reused by every request of that name, so two scratch
tensors alive at the same time inside one op need different names; an op's output is never a workspace
(the next op of the same name would overwrite it). Requests on one device are ordered by its stream.

Lifecycle, per device (`pool(device)`):
- sizing (`attach()`, which each ModelRunner calls as it starts; `detach()` at its close frees the
  buffers once no engine is left): a request larger than its buffer replaces the buffer
  by one of the request's size, so each buffer ends at its name's high-water mark over the warm-up;
- frozen (`freeze()`, once the engine has warmed up): a larger request still grows its buffer on the paths
  that may allocate (prefill, eager steps), and the growth is logged; inside `strict()` (a decode step
  through the CUDA graphs) it raises WorkspaceTooSmall naming the workspace instead of allocating.
A request inside a CUDA-graph capture never grows a buffer (it raises: the step runs once before its
capture, which sizes its workspaces). A buffer handed out during a capture, or `held` by an object that
keeps its view, is never freed when replaced (it stays in `retired`): a graph or that object still reads it.
Under torch.compile tracing, and inside `unpooled()` (kernel autotuning), a request is an ordinary
allocation.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch

log = logging.getLogger("nanovllm")

ALIGN = 256  # bytes: every buffer starts CUDA-aligned for any dtype and vector load


class WorkspaceTooSmall(RuntimeError):
    """A frozen workspace was asked for more bytes than warm-up sized it for."""


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8
    captured: bool = False  # handed out during a CUDA-graph capture: a graph may read it
    engine_held: bool = False  # handed out to an object that lives as long as its engine
    process_held: bool = False  # handed out to an object that outlives engines (FlashInfer's wrappers)

    @property
    def kept(self) -> bool:
        """Someone other than the op that asked may still read it: never freed when replaced."""
        return self.captured or self.engine_held or self.process_held


@dataclass
class WorkspacePool:
    device: torch.device
    frozen: bool = False
    slots: dict[str, _Slot] = field(default_factory=dict)
    retired: list[_Slot] = field(default_factory=list)  # replaced buffers that graphs or holders still read
    users: int = 0  # engines (ModelRunners) using the pool: attach() / detach()
    _strict: int = 0

    def request(self, name: str, shape, dtype: torch.dtype, held: str | None = None) -> torch.Tensor:
        """A view of workspace `name`'s buffer. `held`: the caller keeps the view beyond the op, so the buffer
        stays alive if replaced: "engine" (an object of the engine's lifetime, e.g. the decode graphs) or
        "process" (one that outlives engines: the buffer then survives the last engine's detach())."""
        if held not in (None, "engine", "process"):
            raise ValueError(f"workspace {name!r}: held must be None, 'engine' or 'process', got {held!r}")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"workspace {name!r}: negative shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        slot = self.slots.get(name)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if slot is None or slot.buffer.numel() < nbytes:
            slot = self._grow(name, slot, nbytes, capturing)
        slot.captured |= capturing
        slot.engine_held |= held == "engine"
        slot.process_held |= held == "process"
        return slot.buffer[:nbytes].view(dtype).view(shape)

    def _grow(self, name: str, slot: _Slot | None, nbytes: int, capturing: bool) -> _Slot:
        have = 0 if slot is None else slot.buffer.numel()
        if self.frozen and self._strict:
            raise WorkspaceTooSmall(
                f"workspace {name!r} on {self.device} needs {nbytes} bytes but warm-up sized it at {have}: a "
                "decode step reached this kernel with a shape the engine's warm-up did not run")
        if capturing:
            raise WorkspaceTooSmall(
                f"workspace {name!r} on {self.device} needs {nbytes} bytes (has {have}) inside a CUDA-graph "
                "capture; run the step once before capturing it, so its workspaces are sized outside the graph")
        if self.frozen:
            log.info("workspace %s on %s grew from %d to %d bytes after warm-up", name, self.device, have, nbytes)
        if slot is not None and slot.kept:
            self.retired.append(slot)
        size = -(-nbytes // ALIGN) * ALIGN
        # zeroed once, when allocated: a library workspace (FlashInfer's) starts from zeros as it always did
        self.slots[name] = slot = _Slot(torch.zeros(size, dtype=torch.uint8, device=self.device))
        return slot

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False

    def attach(self) -> None:
        """An engine starts using the pool: it sizes the workspaces again (thawed) as it warms up."""
        self.users += 1
        self.thaw()

    def detach(self) -> None:
        """An engine is done with the pool. With no engine left, the buffers only engines used are freed (so a
        sweep's next model starts from nothing); those held by objects that outlive engines stay."""
        self.users = max(0, self.users - 1)
        if not self.users:
            self.slots = {name: slot for name, slot in self.slots.items() if slot.process_held}
            self.retired = [slot for slot in self.retired if slot.process_held]

    @contextlib.contextmanager
    def strict(self):
        """Inside, once frozen, a request larger than its workspace raises instead of allocating."""
        self._strict += 1
        try:
            yield self
        finally:
            self._strict -= 1

    def sizes(self) -> dict[str, int]:
        """Bytes of each workspace's current buffer."""
        return {name: slot.buffer.numel() for name, slot in sorted(self.slots.items())}

    @property
    def nbytes(self) -> int:
        """Device bytes the pool holds: current buffers and those kept for captured graphs."""
        return sum(self.sizes().values()) + sum(slot.buffer.numel() for slot in self.retired)


_pools: dict[torch.device, WorkspacePool] = {}
_unpooled = 0  # > 0 inside unpooled(): requests are ordinary allocations


def _key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def pool(device) -> WorkspacePool:
    """The process's pool on `device` (kernels' planners outlive engines, and so do their workspaces)."""
    key = _key(device)
    if key not in _pools:
        _pools[key] = WorkspacePool(key)
    return _pools[key]


def workspace(name: str, shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """Scratch of `shape` and `dtype` on `like`'s device, a view of workspace `name`'s buffer (contents
    undefined). Traced (torch.compile, fake tensors): an ordinary allocation."""
    if _unpooled or torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(like):
        return torch.empty(shape, dtype=dtype, device=like.device)
    return pool(like.device).request(name, shape, dtype)


@contextlib.contextmanager
def unpooled():
    """Requests inside are ordinary allocations that leave the pool as it is: kernel autotuning, whose
    benches try shapes and split counts the engine's steps will not use, inside graphs of their own."""
    global _unpooled
    _unpooled += 1
    try:
        yield
    finally:
        _unpooled -= 1
