"""Paged KV-cache blocks: allocation, reference counts and the prefix cache.

A full block whose K/V has been computed is registered under a hash of its tokens chained with the
hash of the block before it, so equal prefixes map to equal blocks. Freed blocks keep their hash and
go to the back of an LRU free list: a later request with the same prefix takes them back, and a block
is only forgotten when it is reused for something else.

With a KV host tier (`host`, nanovllm/engine/kv_host_tier.py) a cached block that is reused moves to the host
first, a prefix hit continues into the host tier (the block comes back into a fresh device block), and a
preempted sequence may swap its blocks out and back in. This class stays bookkeeping: it records the copies in
`copies`, in order, and the engine has the host tier execute them before the step's forward.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

from nanovllm.engine.kv_host_tier import TO_DEVICE, TO_HOST, KVCopy
from nanovllm.engine.sequence import Sequence

if TYPE_CHECKING:
    from nanovllm.engine.kv_host_tier import HostBlockPool


class PrefixHit(NamedTuple):
    """A leading full block of a sequence found cached: on the device (`block`) or else in the host tier (`slot`)."""

    block_hash: int
    tokens: tuple[int, ...]
    block: int | None
    slot: int | None


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 host: HostBlockPool | None = None):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.num_prefix_queried_tokens = 0  # running totals of admitted prompts' tokens and of those found cached
        self.num_prefix_hit_tokens = 0       # of which found on the device or in the host tier:
        self.num_prefix_host_hit_tokens = 0  # those from the host tier
        self.host = host
        self.copies: list[KVCopy] = []       # block copies to run before the next forward, in order

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain_hash(self, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    @property
    def num_prefix_device_hit_tokens(self) -> int:
        return self.num_prefix_hit_tokens - self.num_prefix_host_hit_tokens

    def take_copies(self) -> list[KVCopy]:
        """The block copies recorded since the last call, in order; the caller runs them before the next forward."""
        copies, self.copies = self.copies, []
        return copies

    def _cached_prefix(self, seq: Sequence) -> list[PrefixHit]:
        """The longest run of leading full blocks of `seq` cached on the device or in the host tier."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], None
        for i in range(seq.reusable_prefix_tokens // self.block_size):
            tokens = seq.block_tokens(i, self.block_size)
            prev = self._chain_hash(prev, tokens)
            block_id = self.cached.get(prev)
            if block_id is not None and self.blocks[block_id].tokens == tokens:
                hits.append(PrefixHit(prev, tokens, block_id, None))
                continue
            slot = self.host.lookup(prev, tokens) if self.host is not None else None
            if slot is None:
                break
            hits.append(PrefixHit(prev, tokens, None, slot))
        return hits

    def admit(self, seq: Sequence, num_new_tokens: int) -> int | None:
        """Give a waiting sequence its cached prefix plus room for its first chunk of at most
        `num_new_tokens`. Returns the chunk length, or None (nothing changed) if blocks are short.
        A swapped-out sequence gets its own blocks back instead."""
        assert not seq.block_table
        if seq.swapped_blocks:
            return self._swap_in(seq, num_new_tokens)
        hits = self._cached_prefix(seq)
        # Even on a full hit the last token is recomputed: its logits give the first new token.
        computed = min(len(hits) * self.block_size, seq.num_tokens - 1)
        chunk = min(num_new_tokens, seq.num_tokens - computed)
        revived = sum(1 for h in hits if h.block is not None and self.blocks[h.block].ref_count == 0)
        loaded = sum(1 for h in hits if h.block is None)
        fresh = max(self.blocks_needed(computed + chunk) - len(hits), 0) + loaded
        if self.num_free_blocks - revived < fresh:
            return None
        self.num_prefix_queried_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += computed
        self.num_prefix_host_hit_tokens += sum(max(min(self.block_size, computed - i * self.block_size), 0)
                                               for i, h in enumerate(hits) if h.block is None)
        for h in hits:  # device hits leave the free list before any fresh block is taken from it
            if h.block is not None:
                block = self.blocks[h.block]
                if block.ref_count == 0:
                    del self.free[h.block]
                block.ref_count += 1
        if loaded:
            self.host.pinned.update(h.slot for h in hits if h.block is None)
        for h in hits:
            if h.block is None:
                block = self._take_free_block()
                block.hash, block.tokens = h.block_hash, h.tokens
                self.cached[h.block_hash] = block.block_id
                self.copies.append(KVCopy(TO_DEVICE, block.block_id, h.slot))
            seq.block_table.append(h.block if h.block is not None else block.block_id)
        if loaded:
            self.host.pinned.clear()
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = computed
        self._grow(seq, computed + chunk)
        return chunk

    def can_swap_out(self, seq: Sequence) -> bool:
        return self.host is not None and self.host.can_reserve(self.blocks_needed(seq.num_computed_tokens))

    def swap_out(self, seq: Sequence) -> None:
        """Preempt `seq` by copying its computed blocks into reserved host slots (check can_swap_out first); it
        keeps its progress and gets the blocks back on readmission."""
        computed = seq.num_computed_tokens
        slots = self.host.reserve(self.blocks_needed(computed))
        self.copies.extend(KVCopy(TO_HOST, b, s) for b, s in zip(seq.block_table, slots))
        self.release(seq)
        seq.swapped_blocks, seq.num_computed_tokens = slots, computed

    def _swap_in(self, seq: Sequence, num_new_tokens: int) -> int | None:
        computed = seq.num_computed_tokens
        chunk = min(num_new_tokens, seq.num_tokens - computed)
        if self.blocks_needed(computed + chunk) > self.num_free_blocks:
            return None
        for slot in seq.swapped_blocks:  # its slots stay reserved until every block has its copy recorded
            block = self._take_free_block()
            self.copies.append(KVCopy(TO_DEVICE, block.block_id, slot))
            seq.block_table.append(block.block_id)
        self.host.unreserve(seq.swapped_blocks)
        seq.swapped_blocks = []
        seq.num_hashed_blocks = 0  # the next commit hashes its full blocks again
        self._grow(seq, computed + chunk)
        return chunk

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for the first `num_tokens` tokens of `seq`; False (nothing changed) if out of blocks."""
        if not self.can_grow(seq, num_tokens):
            return False
        self._grow(seq, num_tokens)
        return True

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_free_block().block_id)

    def _take_free_block(self) -> Block:
        """The least recently freed block, now private to its taker (ref count 1, unhashed). A cached prefix it
        held moves to the host tier first, when there is one and it lacks the block."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
            if self.host is not None and self.host.lookup(block.hash, block.tokens) is None:
                slot = self.host.store(block.hash, block.tokens)
                if slot is not None:
                    self.copies.append(KVCopy(TO_HOST, block_id, slot))
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks whose K/V is now computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        prev = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            tokens = seq.block_tokens(i, self.block_size)
            prev = self._chain_hash(prev, tokens)
            if block.hash is None:
                block.hash, block.tokens = prev, tokens
                self.cached.setdefault(prev, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks past the first `num_tokens` tokens of `seq` (a verify step's room for drafts the
        target rejected). Such blocks were grown for this sequence alone and hold no computed token, so they
        are unshared and unhashed: they go to the front of the free list, the first to be reused."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            assert block.ref_count == 1 and block.hash is None, "a trimmed block must be private and unhashed"
            block.ref_count = 0
            self.free[block.block_id] = None
            self.free.move_to_end(block.block_id, last=False)
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, len(seq.block_table))

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; its last blocks are the first to be reused."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0
        if seq.swapped_blocks:
            self.host.unreserve(seq.swapped_blocks)
            seq.swapped_blocks = []
