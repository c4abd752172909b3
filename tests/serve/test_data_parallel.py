"""`python -m nanovllm.serve server.data_parallel=2`: one endpoint over two replica processes. Requests spread
over both, requests sharing a prompt prefix stay on one replica (and hit its prefix cache), /metrics shows each
replica and the totals, the server issue's chaos mix passes, a replica killed mid-stream fails its requests
cleanly and comes back, and SIGTERM drains every replica."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import start_server
from tests.serve.test_chaos import PROMPTS, REQUESTS, check_mix, greedy, make_request, send_mix

SHARED = "You are a careful assistant. " * 12  # longer than server.affinity_prefix_chars (256)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("dp"), "dtype=float64", "server.data_parallel=2",
                     "server.max_body_bytes=16384", "server.max_queued_requests=4096", "server.shutdown_grace_s=60",
                     "server.log_level=warning")
    try:
        yield s.wait_healthy(timeout=400)
    finally:
        s.stop()


def replicas(http) -> list[dict]:
    return http.get("/health").json()["replicas"]


def metric(http, name: str, **labels) -> dict[str, float]:
    """replica label ('' for the total) -> value of the samples called `name` with `labels`."""
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.labels.get("replica", "")] = out.get(s.labels.get("replica", ""), 0.0) + s.value
    return out


def wait_idle(http, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [metric(http, n) for n in ("nanovllm_num_requests_running", "nanovllm_num_requests_waiting",
                                          "nanovllm:kv_cache_usage_perc")]
        if all(v == 0 for m in busy for v in m.values()) and all(len(m) == 3 for m in busy):
            return
        time.sleep(0.1)
    raise AssertionError(f"the replicas are not idle after {timeout} s")


def complete(http, prompt: str, **extra) -> httpx.Response:
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r


def test_two_replicas_each_on_its_own_process(http):
    reps = replicas(http)
    assert [r["replica"] for r in reps] == [0, 1] and all(r["healthy"] for r in reps)
    assert len({r["pid"] for r in reps}) == 2 and len({r["port"] for r in reps}) == 2
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"  # every other route is the replicas'
    assert http.post("/tokenize", json={"prompt": "hi there"}).json()["count"] > 0
    assert http.get("/openapi.json").status_code == 200


def test_distinct_prompts_spread_and_a_shared_prefix_stays_on_one_replica(http):
    async def burst(prompts):
        async with httpx.AsyncClient(base_url=http.base_url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={"prompt": p, "max_tokens": 8,
                                                                         "ignore_eos": True}) for p in prompts))
        assert all(r.status_code == 200 for r in rs)
        return [r.headers["x-nanovllm-replica"] for r in rs]

    spread = asyncio.run(burst([f"{i} distinct opening line number {i}" for i in range(8)]))
    assert set(spread) == {"0", "1"}

    hits_before = metric(http, "nanovllm:prefix_cache_hits_total")
    first = complete(http, SHARED + "question 0").headers["x-nanovllm-replica"]
    same = [complete(http, SHARED + f"question {i}").headers["x-nanovllm-replica"] for i in range(1, 5)]
    same += asyncio.run(burst([SHARED + f"concurrent question {i}" for i in range(3)]))  # within the slack
    assert set(same) == {first}
    hits = metric(http, "nanovllm:prefix_cache_hits_total")
    assert hits[first] > hits_before.get(first, 0)  # the shared prefix came from that replica's cache
    chat = {"messages": [{"role": "system", "content": SHARED}, {"role": "user", "content": "x"}], "max_tokens": 2}
    chats = {http.post("/v1/chat/completions", json=chat).headers["x-nanovllm-replica"] for _ in range(3)}
    assert len(chats) == 1


def test_metrics_per_replica_and_in_total(http):
    wait_idle(http)
    done = metric(http, "nanovllm:request_success_total")
    assert set(done) == {"", "0", "1"} and done["0"] > 0 and done["1"] > 0
    assert done[""] == done["0"] + done["1"]
    tokens = metric(http, "nanovllm:generation_tokens_total")
    assert tokens[""] == tokens["0"] + tokens["1"]
    assert metric(http, "nanovllm:dp_replica_up") == {"0": 1.0, "1": 1.0}
    routed = metric(http, "nanovllm:dp_routed_requests_total", affinity="hit")
    assert sum(routed.values()) >= 6


@pytest.mark.slow  # the suite's time budget: tests/serve/test_chaos.py's mix and the replica tests here stay in it
def test_chaos_mix_against_two_replicas(http, server):
    """tests/serve/test_chaos.py's request mix through the front: none hangs, every refused request gets its
    designed 4xx, every greedy one that was not cancelled the tokens it gets alone, no replica dies or leaks."""
    alone = {p: http.post("/v1/completions", json=greedy(p)).json()["choices"][0]["text"] for p in PROMPTS}
    rng = random.Random(0)
    planned = [make_request(rng, i) for i in range(REQUESTS)]

    results = send_mix(server.url, planned)
    check_mix(planned, results, alone)
    wait_idle(http)  # nothing running or waiting, every KV block free, on both replicas
    assert all(r["healthy"] and r["restarts"] == 0 for r in replicas(http))
    assert metric(http, "nanovllm:dp_outstanding_requests") == {"0": 0.0, "1": 0.0}


@pytest.mark.slow  # the suite's time budget: tests/serve/test_chaos.py's SIGTERM mix stays in it
def test_chaos_then_sigterm_against_two_replicas(spawn_server):
    """tests/serve/test_chaos.py's chaos mix with a SIGTERM a third of the way, against a front over two replicas:
    every request comes back finished, refused as designed or with 503 / an error event, and the front exits 0."""
    from tests.serve.test_chaos import test_chaos_then_sigterm as chaos_then_sigterm

    chaos_then_sigterm(lambda *overrides, **kw: spawn_server(*overrides, "server.data_parallel=2", **kw))


def stream_lines(url: str, body: dict, out: list, started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        out.append(r.headers["x-nanovllm-replica"])
        for line in r.iter_lines():
            if line:
                out.append(line)
                started.set()


def test_killed_replica_fails_its_requests_cleanly_and_comes_back(http, server):
    long = {"prompt": SHARED + "a long answer", "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    lines, started = [], threading.Event()
    streamer = threading.Thread(target=stream_lines, args=(server.url, long, lines, started))
    streamer.start()
    assert started.wait(60)
    victim = int(lines[0])
    waiting = {}

    def post():  # the same prefix: routed to the same replica
        waiting["r"] = httpx.post(server.url + "/v1/completions", json=long, timeout=120)

    poster = threading.Thread(target=post)
    poster.start()
    deadline = time.monotonic() + 30
    while metric(http, "nanovllm:dp_outstanding_requests")[str(victim)] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(replicas(http)[victim]["pid"], signal.SIGKILL)
    streamer.join(60)
    poster.join(60)
    assert not streamer.is_alive() and not poster.is_alive()  # neither hangs
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "replica_failed"
    r = waiting["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "replica_failed" and r.headers["retry-after"]

    deadline = time.monotonic() + 30  # once the front has seen the death, new requests go to the other replica
    while replicas(http)[victim]["healthy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert complete(http, "served by the other one meanwhile").status_code == 200
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        reps = replicas(http)
        if reps[victim]["healthy"]:
            break
        time.sleep(0.5)
    assert reps[victim]["healthy"] and reps[victim]["restarts"] == 1
    assert http.get("/health").json()["status"] == "ok"
    assert metric(http, "nanovllm:dp_replica_restarts_total")[str(victim)] == 1


def test_sigterm_drains_every_replica_then_exits_zero(http, server):
    """Last in the module: it stops the server."""
    pids = [r["pid"] for r in replicas(http)]
    lines, started = [], threading.Event()
    streamer = threading.Thread(target=stream_lines, args=(server.url, {"prompt": "drain me", "max_tokens": 40,
                                                                         "ignore_eos": True}, lines, started))
    streamer.start()
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    for _ in range(100):
        health = http.get("/health")
        if health.status_code == 503:
            break
        time.sleep(0.05)
    assert health.status_code == 503 and health.json()["error"]["code"] == "server_shutting_down"
    refused = http.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    streamer.join(120)
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    code, out = server.wait_exit(timeout=120)
    assert code == 0, out[-3000:]
    for pid in pids:  # every replica has exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
