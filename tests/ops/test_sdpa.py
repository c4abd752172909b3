"""The `sdpa` attention backend against the native paged attention: random paged KV with shuffled block ids,
odd shapes, prefill chunks behind a cached prefix, sliding windows, soft-cap (which falls back)."""

from __future__ import annotations

import pytest
import torch

from nanovllm.ops import AttentionMetadata, get_op, load_plugins
from nanovllm.ops.testing import random_step

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.bfloat16: dict(atol=1.5e-2, rtol=2e-2)}


def paged_meta(q_lens, kv_lens, block_size=4, seed=0, device="cpu") -> tuple[AttentionMetadata, int]:
    return random_step(q_lens, kv_lens, block_size=block_size, seed=seed, device=device)


def run_both(name, q_lens, kv_lens, heads=(6, 2), head_dim=16, window=0, softcap=0.0, dtype=torch.float32,
             device="cpu", scale=0.25, block_size=4):
    load_plugins()
    torch.manual_seed(1)
    meta, num_blocks = paged_meta(q_lens, kv_lens, block_size, device=device)
    kc = torch.randn(num_blocks, block_size, heads[1], head_dim, dtype=dtype, device=device)
    vc = torch.randn_like(kc)
    q = torch.randn(sum(q_lens), heads[0], head_dim, dtype=dtype, device=device)
    op = get_op(name)
    got = op.impls["sdpa"].fn(q, kc, vc, meta, scale, window, softcap)
    want = op.native(q, kc, vc, meta, scale, window, softcap)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("kv_lens", [[1], [5, 17, 33], [4, 8, 1, 30, 13, 2, 9]])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("window", [0, 3, 11])
def test_decode(kv_lens, heads, window):
    run_both("attention_decode", [1] * len(kv_lens), kv_lens, heads=heads, window=window)


@pytest.mark.parametrize("q_lens,kv_lens", [([3], [3]), ([7, 1, 13], [7, 9, 30]),  # fresh, decode-like, chunk
                                            ([5, 2], [21, 2]), ([1, 9, 4], [1, 25, 11])])  # cached prefixes
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)])
@pytest.mark.parametrize("window", [0, 4])
def test_prefill(q_lens, kv_lens, heads, window):
    run_both("attention_prefill", q_lens, kv_lens, heads=heads, window=window)


@pytest.mark.parametrize("name,q_lens", [("attention_decode", [1, 1]), ("attention_prefill", [4, 2])])
def test_softcap_falls_back_to_native(name, q_lens):
    run_both(name, q_lens, [9, 14], softcap=5.0)


def test_float64_and_head_dim_odd():
    run_both("attention_prefill", [2, 5], [6, 5], head_dim=12, dtype=torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("name,q_lens,kv_lens", [("attention_decode", [1] * 17, list(range(1, 400, 24))),
                                                 ("attention_prefill", [37, 1, 200], [300, 77, 200])])
def test_gpu_bf16(name, q_lens, kv_lens):
    run_both(name, q_lens, kv_lens, heads=(16, 8), head_dim=128, window=0, dtype=torch.bfloat16, device="cuda",
             scale=128 ** -0.5, block_size=16)
