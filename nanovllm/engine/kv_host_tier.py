"""The KV host tier: a bounded pool of KV blocks in (pinned) host memory behind the device cache.

Prefix-cache blocks the device reuses for something else move here instead of being forgotten, and come
back on a prefix hit; a preempted sequence may swap its blocks here instead of being recomputed.

`HostBlockPool` is the bookkeeping (no tensors): which host slot holds which prefix block, least recently used
first, and the slots reserved for swapped-out sequences. The BlockManager drives it and records the copies a
step needs as an ordered list of `KVCopy`; `HostKVCache` owns the host tensor and runs those copies before the
step's forward. `PreemptionCosts` chooses between swapping and recomputing from measured costs.

Host layout is page first: one host block holds one device block's K and V of every layer, contiguous, so a run
of consecutive host slots moves in one copy.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from typing import NamedTuple

import torch

from nanovllm.utils.pinned import pinned_empty

TO_HOST, TO_DEVICE = "to_host", "to_device"


class KVCopy(NamedTuple):
    """One block copy: TO_HOST copies device block `device` into host slot `host`; TO_DEVICE the other way."""

    direction: str
    device: int
    host: int


class HostBlockPool:
    """Host slots: unused, holding a cached prefix block (an LRU keyed by the block's chained hash, with its
    tokens to verify a hit), or reserved for a swapped-out sequence (never evicted). Slots a pending admission
    loads from are pinned, so no eviction in the same admission overwrites them."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV host tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._unused = list(range(num_blocks))  # a heap: lowest slot first, so a step's copies form runs
        self.cached: OrderedDict[int, int] = OrderedDict()  # chained hash -> slot, least recently used first
        self.tokens: dict[int, tuple[int, ...]] = {}        # slot -> tokens of the cached block it holds
        self.reserved: set[int] = set()
        self.pinned: set[int] = set()

    @property
    def num_unused(self) -> int:
        return len(self._unused)

    def lookup(self, block_hash: int, tokens: tuple[int, ...]) -> int | None:
        """The slot holding the block with this hash and tokens (now the most recently used), or None."""
        slot = self.cached.get(block_hash)
        if slot is None or self.tokens[slot] != tokens:
            return None
        self.cached.move_to_end(block_hash)
        return slot

    def store(self, block_hash: int, tokens: tuple[int, ...]) -> int | None:
        """A slot for a prefix block leaving the device, registered under its hash; None when every slot is
        reserved or pinned (the block is then forgotten, as without the tier)."""
        old = self.cached.get(block_hash)
        if old is not None:  # same hash, other tokens: the newer block wins, unless a load still needs the older
            if old in self.pinned:
                return None
            del self.cached[block_hash], self.tokens[old]
            heapq.heappush(self._unused, old)
        slot = self._take()
        if slot is not None:
            self.cached[block_hash], self.tokens[slot] = slot, tokens
        return slot

    def can_reserve(self, n: int) -> bool:
        return n <= self.num_unused + len(self.cached) - len(self.pinned)

    def reserve(self, n: int) -> list[int]:
        """`n` slots for a swapped-out sequence, evicting cached blocks if needed (check can_reserve first)."""
        if not self.can_reserve(n):
            raise RuntimeError(f"the KV host tier cannot reserve {n} blocks")
        slots = [self._take() for _ in range(n)]
        self.reserved.update(slots)
        return slots

    def unreserve(self, slots: list[int]) -> None:
        for slot in slots:
            self.reserved.remove(slot)
            heapq.heappush(self._unused, slot)

    def _take(self) -> int | None:
        if self._unused:
            return heapq.heappop(self._unused)
        for block_hash, slot in self.cached.items():  # least recently used first
            if slot not in self.pinned:
                del self.cached[block_hash], self.tokens[slot]
                return slot
        return None

    def check(self) -> None:
        """Raise if the accounting is inconsistent: every slot is exactly one of unused, cached, reserved."""
        cached = set(self.cached.values())
        parts = [set(self._unused), cached, self.reserved]
        if sum(map(len, parts)) != self.num_blocks or set().union(*parts) != set(range(self.num_blocks)):
            raise AssertionError("KV host tier slots are lost or double-booked")
        if len(cached) != len(self.cached) or set(self.tokens) != cached or not self.pinned <= cached:
            raise AssertionError("KV host tier cache index is inconsistent")


def _runs(copies: list[KVCopy], limit: int) -> list[list[KVCopy]]:
    """Consecutive copies of one direction, cut at `limit` copies and wherever a target repeats (so the copies of
    a run may execute in any order and the runs in sequence keep the recorded order's meaning)."""
    runs: list[list[KVCopy]] = []
    targets: set[int] = set()
    for c in copies:
        target = c.host if c.direction == TO_HOST else c.device
        if not runs or runs[-1][0].direction != c.direction or len(runs[-1]) == limit or target in targets:
            runs.append([])
            targets = set()
        runs[-1].append(c)
        targets.add(target)
    return runs


def _spans(slots: list[int]) -> list[tuple[int, int, int]]:
    """(first row, first slot, length) of each stretch of consecutive slots in `slots`."""
    spans: list[tuple[int, int, int]] = []
    for row, slot in enumerate(slots):
        if spans and spans[-1][1] + spans[-1][2] == slot:
            spans[-1] = (spans[-1][0], spans[-1][1], spans[-1][2] + 1)
        else:
            spans.append((row, slot, 1))
    return spans


class HostKVCache:
    """The host tier's tensor, (blocks, layers, K/V, block bytes) of raw bytes (an fp8 cache copies as is), pinned
    on cuda, and the copies between it and the runner's device cache. A run of copies gathers its blocks of every
    layer into a device staging buffer and moves each stretch of consecutive host slots in one copy. On cuda the
    copies run on a side stream that first waits for the work queued before them; the compute stream then waits
    for the copies, so a block that leaves the device is read before the step that reuses it writes it."""

    def __init__(self, runner, num_blocks: int, staging_bytes: int = 64 << 20):
        self.runner = runner
        k = runner.kv_cache[0][0]
        self.device = k.device
        self.is_cuda = self.device.type == "cuda"
        self.num_layers = len(runner.kv_cache)
        self.block_bytes = self._raw(k).shape[1]  # of one layer's K (or V)
        shape = (self.num_layers, 2, self.block_bytes)
        size = (num_blocks, *shape)
        self.blocks = pinned_empty(size) if self.is_cuda else torch.empty(size, dtype=torch.uint8)
        staging_blocks = min(max(staging_bytes // self.bytes_per_block, 1), num_blocks)
        self.staging = torch.empty((staging_blocks, *shape), dtype=torch.uint8, device=self.device)
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * 2 * self.block_bytes

    @staticmethod
    def _raw(cache: torch.Tensor) -> torch.Tensor:
        return cache.view(torch.uint8).view(cache.shape[0], -1)

    @torch.inference_mode()
    def run(self, copies: list[KVCopy]) -> None:
        """Execute the copies in their recorded order, before the next forward on the current stream."""
        if not copies:
            return
        if not self.is_cuda:
            self._run(copies)
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            self._run(copies)
        compute.wait_stream(self.stream)

    def _run(self, copies: list[KVCopy]) -> None:
        caches = [(self._raw(k), self._raw(v)) for k, v in self.runner.kv_cache]
        for run in _runs(copies, len(self.staging)):
            run.sort(key=lambda c: c.host)  # independent copies: in host order, consecutive slots move as one
            n = len(run)
            stage = self.staging[:n]
            device = torch.tensor([c.device for c in run], pin_memory=self.is_cuda).to(self.device, non_blocking=True)
            spans = _spans([c.host for c in run])
            if run[0].direction == TO_HOST:
                for layer, (k, v) in enumerate(caches):
                    torch.index_select(k, 0, device, out=stage[:, layer, 0])
                    torch.index_select(v, 0, device, out=stage[:, layer, 1])
                for row, slot, length in spans:
                    self.blocks[slot:slot + length].copy_(stage[row:row + length], non_blocking=True)
            else:
                for row, slot, length in spans:
                    stage[row:row + length].copy_(self.blocks[slot:slot + length], non_blocking=True)
                for layer, (k, v) in enumerate(caches):
                    k.index_copy_(0, device, stage[:, layer, 0])
                    v.index_copy_(0, device, stage[:, layer, 1])

    def synchronize(self) -> None:
        if self.is_cuda:
            self.stream.synchronize()


def measure_bandwidth(device: torch.device, num_bytes: int = 64 << 20, repeats: int = 3) -> float:
    """Bytes per second of a host-to-device copy (pinned on cuda; a plain memcpy on CPU): the best of `repeats`
    after one untimed copy that pays for setup."""
    cuda = device.type == "cuda"
    src = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0) if i else best
    return num_bytes / max(best, 1e-9)


class PreemptionCosts:
    """Swap or recompute: swapping costs the sequence's blocks out and back in at the measured host-device
    bandwidth; recomputing costs its computed tokens at the prefill throughput of the engine's real prefill steps
    (an exponential running average). Until a prefill step has been measured, recompute."""

    def __init__(self, bandwidth: float, bytes_per_block: int, smoothing: float = 0.2):
        self.bandwidth, self.bytes_per_block, self.smoothing = bandwidth, bytes_per_block, smoothing
        self.prefill_tokens_per_s: float | None = None

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        rate = num_tokens / seconds
        old = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = rate if old is None else old + self.smoothing * (rate - old)

    def swap_is_cheaper(self, num_blocks: int, num_tokens: int) -> bool:
        if self.prefill_tokens_per_s is None:
            return False
        swap_s = 2 * num_blocks * self.bytes_per_block / self.bandwidth
        return swap_s < num_tokens / self.prefill_tokens_per_s


class KVHostTier:
    """The engine's host tier: the slot bookkeeping the BlockManager drives, the host tensor with its copies, and
    the costs the scheduler's auto preemption mode compares."""

    def __init__(self, runner, gib: float):
        bytes_per_block = runner.kv_bytes_per_token * runner.block_size
        num_blocks = int(gib * 2**30 // bytes_per_block)
        if num_blocks < 1:
            raise ValueError(f"kv_offload_gb={gib} holds no KV block ({bytes_per_block} bytes each); raise it or "
                             "set 0 (no host tier)")
        self.pool = HostBlockPool(num_blocks)
        self.cache = HostKVCache(runner, num_blocks)
        self.costs = PreemptionCosts(measure_bandwidth(self.cache.device), self.cache.bytes_per_block)

    @property
    def summary(self) -> str:
        gib = self.pool.num_blocks * self.cache.bytes_per_block / 2**30
        return (f"KV host tier: {self.pool.num_blocks} blocks, {gib:.3f} GiB{' pinned' if self.cache.is_cuda else ''}, "
                f"{self.costs.bandwidth / 1e9:.1f} GB/s host to device")

    def run(self, copies: list[KVCopy]) -> None:
        self.cache.run(copies)

    def observe_step(self, batch, seconds: float) -> None:
        """A step was launched in `seconds`. One with a prompt chunk and a row that samples ran synchronously
        (its tokens were read): its tokens feed the prefill throughput."""
        if any(item.num_new_tokens > 1 for item in batch) and any(item.completes for item in batch):
            self.costs.observe_prefill(sum(item.num_new_tokens for item in batch), seconds)
