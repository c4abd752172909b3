"""Paged KV-cache blocks: allocation, reference counts and the prefix cache.

A full block whose K/V has been computed is registered under a hash of its tokens chained with the
hash of the block before it, so equal prefixes map to equal blocks. Freed blocks keep their hash and
go to the back of an LRU free list: a later request with the same prefix takes them back, and a block
is only forgotten when it is reused for something else.
"""

from __future__ import annotations

from collections import OrderedDict

from nanovllm.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.num_prefix_queried_tokens = 0  # running totals of admitted prompts' tokens and of those found cached
        self.num_prefix_hit_tokens = 0

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

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest run of leading full blocks of `seq` already in the cache."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], None
        for i in range(seq.reusable_prefix_tokens // self.block_size):
            tokens = seq.block_tokens(i, self.block_size)
            prev = self._chain_hash(prev, tokens)
            block_id = self.cached.get(prev)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            hits.append(block_id)
        return hits

    def admit(self, seq: Sequence, num_new_tokens: int) -> int | None:
        """Give a waiting sequence its cached prefix plus room for its first chunk of at most
        `num_new_tokens`. Returns the chunk length, or None (nothing changed) if blocks are short."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        # Even on a full hit the last token is recomputed: its logits give the first new token.
        computed = min(len(hits) * self.block_size, seq.num_tokens - 1)
        chunk = min(num_new_tokens, seq.num_tokens - computed)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        fresh = max(self.blocks_needed(computed + chunk) - len(hits), 0)
        if self.num_free_blocks - revived < fresh:
            return None
        self.num_prefix_queried_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += computed
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = computed
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
            block_id, _ = self.free.popitem(last=False)  # least recently freed first
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.tokens, block.ref_count = None, (), 1
            seq.block_table.append(block_id)

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
