"""Continuous batching and cancellation against a real server: concurrent clients share decode steps,
a client that goes away frees its KV blocks, and 1,000 requests with random cancellations leak nothing."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from nanovllm.serve.background import serve_model

ENGINE = dict(device="cpu", max_model_len=128, num_kvcache_blocks=256, kvcache_block_size=16, max_num_seqs=32)


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_model(tiny_model, "tiny", max_queued_requests=4096, **ENGINE) as s:
        yield s


def wait_idle(server, timeout: float = 20.0):
    """Wait (bounded) until the engine runs nothing and every KV block is free; returns the stats."""
    engine = server.app.state.serve.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats
        if not s.running and not s.waiting and s.free_blocks == s.num_blocks and not engine._requests:
            return s
        time.sleep(0.01)
    raise AssertionError(f"engine not idle after {timeout} s: {engine.stats}, {len(engine._requests)} requests")


def test_concurrent_requests_share_steps(server):
    """8 clients x 8 tokens: batched, the engine needs far fewer steps than the 64 tokens."""
    before = wait_idle(server)

    async def one(c, i):
        r = await c.post("/v1/completions", json={"prompt": f"request {i}", "max_tokens": 8, "temperature": 0,
                                                  "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(8)))

    tokens = sum(asyncio.run(main()))
    after = wait_idle(server)
    assert tokens == 64
    assert after.max_running > 1
    assert after.steps - before.steps < tokens / 2, (after.steps - before.steps, tokens)


def test_streaming_disconnect_frees_blocks(server):
    engine = server.app.state.serve.engine
    wait_idle(server)
    aborted = engine.metrics.requests.labels("abort")._value.get()
    body = {"prompt": "Hello " * 20, "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # a few events, then hang up mid-stream
        assert got[0].startswith("data: ")
        assert engine.stats.free_blocks < engine.stats.num_blocks  # it holds blocks while it runs
    stats = wait_idle(server)
    assert engine.metrics.requests.labels("abort")._value.get() == aborted + 1
    assert stats.free_blocks == stats.num_blocks


def test_nonstreaming_disconnect_frees_blocks(server):
    """A client that times out on a whole (non-streamed) response: the server notices and aborts."""
    engine = server.app.state.serve.engine
    wait_idle(server)
    aborted = engine.metrics.requests.labels("abort")._value.get()
    body = {"prompt": "Hello", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "n": 2}
    with httpx.Client(base_url=server.url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=body)
    wait_idle(server, timeout=5)  # well before 120 decode steps would have finished
    assert engine.metrics.requests.labels("abort")._value.get() == aborted + 2


def test_1000_requests_with_random_cancellations_leak_nothing(server):
    """Mixed streamed / whole / chat requests, 32 at a time; a quarter are cancelled at a random point.
    No 5xx, every block free at the end, the engine and the server track no request."""
    rng = random.Random(0)
    statuses: dict[int, int] = {}
    total, concurrency = 1000, 32

    async def one(c, i):
        kind = rng.choice(["stream", "whole", "chat"])
        body = {"max_tokens": rng.randint(1, 4), "temperature": 0, "ignore_eos": True}
        path = "/v1/completions"
        if kind == "chat":
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"q{i}"}]
        else:
            body["prompt"] = f"{i} " * rng.randint(1, 20)  # at most 80 tokens (digits are single tokens)
        body["stream"] = kind != "whole"
        cancel_after = rng.random() * 0.05 if rng.random() < 0.25 else None

        async def call() -> int:
            if not body["stream"]:
                return (await c.post(path, json=body)).status_code
            async with c.stream("POST", path, json=body) as r:
                async for _ in r.aiter_lines():
                    pass
                return r.status_code

        try:
            status = await asyncio.wait_for(call(), cancel_after)
        except asyncio.TimeoutError:
            status = 0  # cancelled by us
        statuses[status] = statuses.get(status, 0) + 1

    async def worker(w):
        # a client per worker: one httpx pool shared by many tasks slows down sharply with concurrency
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            for i in range(w, total, concurrency):
                await one(c, i)

    async def main():
        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(concurrency))), timeout=150)

    t0 = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert sum(statuses.values()) == total
    assert set(statuses) <= {0, 200}, statuses
    assert statuses.get(0, 0) > 50 and statuses[200] > 500, statuses
    stats = wait_idle(server)
    llm_engine = server.app.state.serve.engine.engine
    assert not llm_engine.requests and not llm_engine.has_unfinished()
    assert llm_engine.block_manager.num_free_blocks == llm_engine.block_manager.num_blocks == stats.num_blocks
    print(f"1000 requests in {elapsed:.1f} s: {statuses}, {stats.steps} steps, max batch {stats.max_running}")


def test_idle_engine_thread_sleeps(server):
    """With nothing to run, the engine thread blocks on its command queue: it burns no CPU."""
    import os

    wait_idle(server)
    tid = server.app.state.serve.engine._thread.native_id
    stat = f"/proc/self/task/{tid}/stat"
    if not os.path.exists(stat):
        pytest.skip("needs Linux /proc")

    def cpu_ticks() -> int:
        fields = open(stat).read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks

    before = cpu_ticks()
    time.sleep(1.0)
    assert cpu_ticks() - before <= 2  # a spinning thread would show ~100 ticks
