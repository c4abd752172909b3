"""Random attention steps for tests and benchmarks: requests on shuffled KV blocks, built as the model
runner builds them (device tensors plus the `host` numpy arrays that plan hooks read)."""

from __future__ import annotations

import dataclasses

import numpy as np

from nanovllm.ops.meta import AttentionMetadata, build_metadata, verify_requests


def random_tables(kv_lens, block_size: int, shared_blocks: int, seed: int) -> tuple[list[list[int]], int]:
    """(block tables of requests holding kv_lens tokens on shuffled blocks, number of blocks used). The first
    `shared_blocks` blocks of every request are the same ids (a cached prefix)."""
    rng = np.random.default_rng(seed)
    need = [-(-k // block_size) for k in kv_lens]
    num_blocks = shared_blocks + sum(n - shared_blocks for n in need) + 5
    free = list(rng.permutation(num_blocks))
    shared = [free.pop() for _ in range(shared_blocks)]
    tables = []
    for n in need:
        if shared_blocks and n <= shared_blocks:
            raise ValueError("a shared prefix must leave each request a block of its own")
        tables.append(shared + [free.pop() for _ in range(n - shared_blocks)])
    return tables, num_blocks


def random_step(q_lens, kv_lens, *, block_size: int = 4, shared_blocks: int = 0, seed: int = 0,
                device="cpu") -> tuple[AttentionMetadata, int]:
    """Requests with q_lens new tokens at the end of kv_lens tokens. Returns (meta, num_blocks); a cache needs
    num_blocks + 1 blocks, the last being the runner's scratch block."""
    tables, num_blocks = random_tables(kv_lens, block_size, shared_blocks, seed)
    # one padding column, as in real steps
    step = build_metadata(tables, kv_lens, block_size, q_lens=q_lens, width=max(map(len, tables)) + 1)
    return step.to_device(device), num_blocks


def verify_step(q_lens, kv_lens, *, block_size: int = 4, seed: int = 0,
                device="cpu") -> tuple[AttentionMetadata, int]:
    """A speculative verify step (AttentionMetadata.verify): the last q_lens[i] tokens of request i's
    kv_lens[i], each a one-query request over request i's blocks. Returns (meta, num_blocks) as random_step."""
    tables, num_blocks = random_tables(kv_lens, block_size, 0, seed)
    step = build_metadata(*verify_requests(tables, kv_lens, q_lens), block_size, width=max(map(len, tables)) + 1)
    return dataclasses.replace(step.to_device(device), verify=True), num_blocks
