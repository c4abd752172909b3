"""Random attention steps for tests and benchmarks: requests on shuffled KV blocks, built as the model
runner builds them (device tensors plus the `host` numpy arrays that plan hooks read)."""

from __future__ import annotations

import numpy as np
import torch

from nanovllm.ops.meta import AttentionMetadata


def random_step(q_lens, kv_lens, *, block_size: int = 4, shared_blocks: int = 0, seed: int = 0,
                device="cpu") -> tuple[AttentionMetadata, int]:
    """Requests with q_lens new tokens at the end of kv_lens tokens. The first `shared_blocks` blocks of every
    request are the same ids (a cached prefix). Returns (meta, num_blocks); a cache needs num_blocks + 1
    blocks, the last being the runner's scratch block."""
    rng = np.random.default_rng(seed)
    need = [-(-k // block_size) for k in kv_lens]
    num_blocks = shared_blocks + sum(n - shared_blocks for n in need) + 5
    free = list(rng.permutation(num_blocks))
    shared = [free.pop() for _ in range(shared_blocks)]
    tables = np.zeros((len(kv_lens), max(need) + 1), dtype=np.int64)  # one padding column, as in real steps
    pos, slots, pad = [], [], []
    for b, (ql, kl, n) in enumerate(zip(q_lens, kv_lens, need)):
        if shared_blocks and n <= shared_blocks:
            raise ValueError("a shared prefix must leave each request a block of its own")
        tables[b, :n] = shared + [free.pop() for _ in range(n - shared_blocks)]
        p = np.arange(kl - ql, kl)
        pos.append(p)
        slots.append(tables[b][p // block_size] * block_size + p % block_size)
        pad.append(b * max(q_lens) + np.arange(ql))
    host = dict(seq_lens=np.array(kv_lens), cu_seqlens_q=np.cumsum([0, *q_lens]), block_tables=tables,
                num_blocks=np.array(need))

    def dev(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    meta = AttentionMetadata(dev(np.concatenate(pos)), dev(np.concatenate(slots)), dev(host["seq_lens"]),
                             dev(tables), dev(host["cu_seqlens_q"]), dev(np.concatenate(pad)), max(q_lens),
                             max(kv_lens), host=host)
    return meta, num_blocks
