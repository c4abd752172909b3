"""The kernel workspace pool: views of one buffer per name, sized by the high-water mark while thawed, fixed
and strict once frozen, ordinary allocations under autotuning."""

from __future__ import annotations

import pytest
import torch

from nanovllm.ops.workspace import WorkspacePool, WorkspaceTooSmall, unpooled, workspace
from nanovllm.ops.workspace import pool as pool_of


def test_requests_view_one_buffer_per_name():
    pool = WorkspacePool(torch.device("cpu"))
    a = pool.request("a", (4, 8), torch.float32)
    b = pool.request("a", (2, 3), torch.int64)
    assert a.shape == (4, 8) and b.shape == (2, 3) and b.dtype == torch.int64
    assert a.data_ptr() == b.data_ptr()  # the same buffer: one name is one scratch at a time
    c = pool.request("c", (4, 8), torch.float32)
    assert c.data_ptr() != a.data_ptr()  # scratch alive together takes two names
    assert pool.sizes() == {"a": 256, "c": 256}  # 128 bytes, aligned up


def test_sizing_grows_to_the_high_water_mark_then_freezes():
    pool = WorkspacePool(torch.device("cpu"))
    for n in (10, 1000, 100):
        pool.request("split_k", (n,), torch.float32)
    assert pool.sizes()["split_k"] == 4096 and not pool.retired  # replaced buffers no one holds are freed
    pool.freeze()
    first = pool.request("split_k", (1000,), torch.float32).data_ptr()
    with pool.strict(), pytest.raises(WorkspaceTooSmall, match="'split_k'.*8000 bytes.*4096"):
        pool.request("split_k", (2000,), torch.float32)
    assert pool.request("split_k", (1000,), torch.float32).data_ptr() == first
    pool.request("split_k", (2000,), torch.float32)  # outside strict() a frozen pool still grows (logged)
    assert pool.sizes()["split_k"] == 8192


def test_held_buffers_stay_alive_when_replaced():
    pool = WorkspacePool(torch.device("cpu"))
    held = pool.request("fi", (16,), torch.uint8, held="process")
    pool.request("fi", (1024,), torch.uint8)
    assert len(pool.retired) == 1 and pool.retired[0].buffer.data_ptr() == held.data_ptr()
    assert pool.nbytes == 1024 + 256


def test_the_last_engine_to_detach_frees_what_only_engines_used():
    pool = WorkspacePool(torch.device("cpu"))
    pool.attach()
    pool.attach()  # e.g. a draft model's engine and the target's
    pool.request("fi", (16,), torch.uint8, held="process")
    pool.request("fi", (1024,), torch.uint8, held="process")
    pool.request("split_k", (64,), torch.float32)
    pool.request("noise", (8,), torch.float32, held="engine")
    pool.request("noise", (800,), torch.float32)
    pool.freeze()
    pool.detach()
    assert set(pool.sizes()) == {"fi", "split_k", "noise"} and len(pool.retired) == 2 and pool.frozen
    pool.detach()
    assert set(pool.sizes()) == {"fi"} and len(pool.retired) == 1 and pool.users == 0


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="'x'.*negative"):
        WorkspacePool(torch.device("cpu")).request("x", (2, -1), torch.float32)
    with pytest.raises(ValueError, match="'x'.*held must be"):
        WorkspacePool(torch.device("cpu")).request("x", (2,), torch.float32, held=True)


def test_workspace_routes_to_the_device_pool_except_when_unpooled():
    like = torch.zeros(1)
    t = workspace("test_workspace_scratch", (3, 5), torch.float16, like)
    assert t.shape == (3, 5) and t.dtype == torch.float16
    assert "test_workspace_scratch" in pool_of("cpu").sizes()
    with unpooled():
        u = workspace("test_workspace_unpooled", (7,), torch.float32, like)
    assert u.shape == (7,) and "test_workspace_unpooled" not in pool_of("cpu").sizes()
