"""Weight offloading (`cpu_offload_gb`): part of the decoder layers' weights live in host memory and are streamed
to the device ahead of the layer that reads them.

Which weights: `plan_offload` takes whole layers' matrices, spread evenly over the depth (every offloaded byte
costs the same host-to-device time per forward pass; spacing the offloaded layers out lets each copy run under
the compute of the resident layers before it). A layer only partly needed gives its largest matrices first.
Embeddings, the LM head, norms, biases and quantized weights stay on the device.

How: each offloaded layer keeps its weights in one flat host buffer (pinned when the device is CUDA). The device
holds two staging slots, each the size of the largest offloaded layer; the k-th offloaded layer (in depth order)
runs from slot k % 2, its Parameters' .data being views into that slot. A forward pass forks a copy stream at its
start, which copies the first two offloaded layers; the copy of offloaded layer k + 2 waits for layer k's compute
(an event), and layer k's compute waits for its copy (an event). The host buffers, slots and events are fixed, so
the forward pass allocates nothing and never waits on the host: it captures into a CUDA graph. On the CPU the
copies run in program order, which keeps the same invariants.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from nanovllm.utils.pinned import pinned_empty

log = logging.getLogger("nanovllm")

GIB = 2**30
ALIGN = 256  # bytes: every tensor in a host buffer and slot starts at a multiple (kernels need aligned weights)


def _spread(m: int, n: int) -> list[int]:
    """m of the indices 0..n-1, evenly spaced and centred (m <= n)."""
    return [(2 * k + 1) * n // (2 * m) for k in range(m)]


def plan_offload(layer_tensors: list[dict[str, int]], budget: int) -> dict[int, tuple[str, ...]]:
    """The tensors to offload for a budget in bytes: layer index -> parameter names, largest first.

    layer_tensors[i]: the offloadable tensors of layer i (name -> bytes). The fewest layers whose tensors reach
    the budget are chosen, evenly spread over the layers that have any; they are offloaded whole, but for the
    last, which gives its largest tensors until the budget is reached (so it may be exceeded by less than one
    tensor). A budget above every offloadable byte is an error."""
    if budget <= 0:
        return {}
    total = sum(map(sum, (t.values() for t in layer_tensors)))
    if budget > total:
        raise ValueError(f"cpu_offload_gb={budget / GIB:.3g} exceeds the offloadable weights ({total / GIB:.3g} GiB: "
                         "the decoder layers' dense matrices; embeddings, LM head, norms and quantized weights stay "
                         f"on the device); set cpu_offload_gb <= {math.floor(total / GIB * 1000) / 1000}")
    candidates = [i for i, t in enumerate(layer_tensors) if t]
    for m in range(1, len(candidates) + 1):
        picks = [candidates[j] for j in _spread(m, len(candidates))]
        if sum(sum(layer_tensors[i].values()) for i in picks) >= budget:
            break
    plan, left = {}, budget
    for i in picks:
        names = sorted(layer_tensors[i], key=lambda name: -layer_tensors[i][name])
        chosen = []
        for name in names:
            if left <= 0:
                break
            chosen.append(name)
            left -= layer_tensors[i][name]
        if chosen:
            plan[i] = tuple(chosen)
    return plan


def suggest_offload_gib(weight_bytes: int, largest_layer: int, available: int) -> float:
    """The cpu_offload_gb (GiB, rounded up to a tenth) that leaves the resident weights plus the two staging
    slots within `available` bytes."""
    return math.ceil((weight_bytes + 2 * largest_layer - available) / GIB * 10) / 10


def check_weights_fit(needed: int, weight_bytes: int, largest_layer: int, offloadable: int, utilization: float,
                      free: int, total: int) -> None:
    """Raise before anything is allocated when the weights the device must hold (`needed`: resident weights plus
    staging slots) exceed what gpu_memory_utilization leaves of the card (`free`, `total`: its memory now).
    `offloadable`: the bytes cpu_offload_gb can move at most."""
    available = utilization * total - (total - free)
    if needed <= available:
        return
    head = (f"the weights need {needed / GIB:.2f} GiB but gpu_memory_utilization={utilization:g} of the card's "
            f"{total / GIB:.1f} GiB leaves {available / GIB:.2f} GiB")
    suggested = suggest_offload_gib(weight_bytes, largest_layer, int(available))
    if suggested * GIB > offloadable:
        raise MemoryError(f"{head}, and offloading every layer (cpu_offload_gb={offloadable / GIB:.2f}) would not "
                          "make room: raise gpu_memory_utilization or quantize the weights")
    raise MemoryError(f"{head}: set cpu_offload_gb >= {suggested} (and keep room for the KV cache)")


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def offloadable_tensors(model: nn.Module, dtype: torch.dtype) -> list[dict[str, int]]:
    """Per decoder layer: its dense matrices (name -> bytes in `dtype`); quantized weights stay resident."""
    quantized = getattr(model, "quantized", {})
    return [{name: _nbytes(p.shape, dtype) for name, p in layer.named_parameters(recurse=False)
             if p.dim() >= 2 and f"layers.{layer.idx}.{name}" not in quantized} for layer in model.layers]


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of every weight once loaded: dense ones in `dtype`, quantized ones at their format's bits (their
    scales left out)."""
    from nanovllm.quant.weights import BITS

    quantized = getattr(model, "quantized", {})
    return sum(p.numel() * BITS[quantized[name]] // 8 if name in quantized else _nbytes(p.shape, dtype)
               for name, p in model.named_parameters())


class WeightOffloader:
    """Host copies and device staging slots of the offloaded weights, and the copy schedule around each layer.
    Built on a model whose weights are still meta placeholders (deferred_weights): the offloaded ones become
    views into the host buffer, which loading then fills."""

    def __init__(self, model: nn.Module, plan: dict[int, tuple[str, ...]], device: torch.device,
                 dtype: torch.dtype):
        self.device, self.cuda = device, device.type == "cuda"
        ranked = sorted(plan)
        self.order = {i: k for k, i in enumerate(ranked)}  # layer index -> its rank among offloaded layers
        # per rank: the layer's span of the host buffer, and (parameter, offset in the span, bytes) per weight
        self.spans: list[tuple[int, int]] = []
        self.params: list[list[tuple[nn.Parameter, int, int]]] = []
        layout, size = [], 0
        for i in ranked:
            entries, start = [], size
            for name in plan[i]:
                nbytes = _nbytes(getattr(model.layers[i], name).shape, dtype)
                entries.append((name, size - start, nbytes))
                size += -(-nbytes // ALIGN) * ALIGN
            layout.append(entries)
            self.spans.append((start, size - start))
        # page-locked at exactly its size on a GPU (copies from it run asynchronously); the parameters are views
        self.host = pinned_empty(size) if self.cuda else torch.empty(size, dtype=torch.uint8)
        for i, (start, _), entries in zip(ranked, self.spans, layout):
            layer, params = model.layers[i], []
            for name, offset, nbytes in entries:
                shape = getattr(layer, name).shape
                view = self.host[start + offset:start + offset + nbytes].view(dtype).view(shape)
                param = nn.Parameter(view, requires_grad=False)
                setattr(layer, name, param)  # loading writes into the host buffer
                params.append((param, offset, nbytes))
            self.params.append(params)
        self.slot_bytes = max((n for _, n in self.spans), default=0)
        self.slots: list[torch.Tensor] = []
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        events = lambda: [torch.cuda.Event() if self.cuda else None for _ in ranked]  # noqa: E731
        self.copied, self.done = events(), events()
        self.start = torch.cuda.Event() if self.cuda else None

    @property
    def offloaded_bytes(self) -> int:
        return sum(nbytes for params in self.params for _, _, nbytes in params)

    def attach(self, model: nn.Module) -> None:
        """Once, after loading and weight layouts: data a layout replaced goes back into the host buffer, the
        Parameters become views into their staging slot, and the model's forward pass starts streaming."""
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        for k, ((start, _), params) in enumerate(zip(self.spans, self.params)):
            for param, offset, nbytes in params:
                host = self.host[start + offset:start + offset + nbytes].view(param.dtype).view(param.shape)
                if param.data.data_ptr() != host.data_ptr():
                    if param.data.nbytes != nbytes or param.dtype != host.dtype:
                        raise RuntimeError(f"a weight layout changed an offloaded weight's size ({param.shape})")
                    host.copy_(param.data)
                param.data = self.slots[k % 2][offset:offset + nbytes].view(param.dtype).view(param.shape)
        model.offloader = self

    def _copy(self, k: int, after) -> None:
        """Queue the copy of offloaded layer k into its slot, after the event `after` (CUDA)."""
        start, nbytes = self.spans[k]
        source, target = self.host[start:start + nbytes], self.slots[k % 2][:nbytes]
        if not self.cuda:
            target.copy_(source)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            target.copy_(source, non_blocking=True)
            self.copied[k].record(self.stream)

    def before_layer(self, i: int) -> None:
        """Layer i is next: at the first layer, start the first two copies; an offloaded layer waits for its copy."""
        if i == 0:  # fork: the copies follow everything queued before this forward pass (earlier slot readers)
            if self.cuda:
                self.start.record(torch.cuda.current_stream(self.device))
            for k in range(min(2, len(self.spans))):
                self._copy(k, self.start)
        k = self.order.get(i)
        if k is not None and self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[k])

    def after_layer(self, i: int) -> None:
        """Layer i is queued: offloaded layer k's slot takes layer k + 2 once its compute is done."""
        k = self.order.get(i)
        if k is None or k + 2 >= len(self.spans):
            return
        if self.cuda:
            self.done[k].record(torch.cuda.current_stream(self.device))
        self._copy(k + 2, self.done[k])


def place_weights(model: nn.Module, config, device: torch.device, dtype: torch.dtype) -> WeightOffloader | None:
    """Give the meta placeholders of a model built under deferred_weights their memory: offloaded weights (for
    config.cpu_offload_gb) in host memory, the others on `device` in `dtype` (quantized placeholders stay, for
    loading to install). On CUDA, first check that the device weights fit gpu_memory_utilization."""
    tensors = offloadable_tensors(model, dtype)
    plan = plan_offload(tensors, int(config.cpu_offload_gb * GIB))
    offloaded = sum(tensors[i][name] for i, names in plan.items() for name in names)
    staging = 2 * max((sum(tensors[i][name] for name in names) for i, names in plan.items()), default=0)
    total = weight_bytes(model, dtype)
    if device.type == "cuda":
        free, card = torch.cuda.mem_get_info(device)
        sizes = [sum(t.values()) for t in tensors]
        check_weights_fit(total - offloaded + staging, total, max(sizes), sum(sizes), config.gpu_memory_utilization,
                          free, card)
    offloader = WeightOffloader(model, plan, device, dtype) if plan else None
    quantized = getattr(model, "quantized", {})
    placed: dict[int, nn.Parameter] = {}  # tied weights are one Parameter: placed once
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta or f"{prefix}.{name}".lstrip(".") in quantized:
                continue
            if id(p) not in placed:
                placed[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False)
            module._parameters[name] = placed[id(p)]
    for layer in model.layers:
        layer.bundle_decode_weights()
    if offloader is not None:
        log.info("cpu_offload_gb: %.2f GiB of %d layers' weights in host memory, streamed through 2 x %.2f GiB "
                 "of device staging", offloaded / GIB, len(plan), offloader.slot_bytes / GIB)
    return offloader
