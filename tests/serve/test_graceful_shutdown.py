"""SIGTERM on `python -m nanovllm.serve`: new requests get 503 with Retry-After and /health 503, running
requests get server.shutdown_grace_s to finish, then each unfinished stream ends with an error event and
[DONE] (a non-streamed request with a 503 error), and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

LONG = {"prompt": "hello there", "temperature": 0, "ignore_eos": True}


def stream_lines(url: str, body: dict, out: list, started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line:
                out.append(line)
                started.set()


def start_stream(url: str, max_tokens: int) -> tuple[threading.Thread, list]:
    lines, started = [], threading.Event()
    t = threading.Thread(target=stream_lines, args=(url, {**LONG, "max_tokens": max_tokens}, lines, started))
    t.start()
    assert started.wait(60), "the stream sent nothing"
    return t, lines


def wait_running(url: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        running = next(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("nanovllm_num_requests_running "))
        if running >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} requests were not running within {timeout} s")


def test_grace_zero_ends_streams_with_error_event_and_done(spawn_server):
    server = spawn_server("server.shutdown_grace_s=0", "engine.max_model_len=4096").wait_healthy()
    t, lines = start_stream(server.url, 4000)
    blocking = {}

    def post():  # a non-streamed request running when the signal comes
        blocking["r"] = httpx.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 4000}, timeout=120)

    waiter = threading.Thread(target=post)
    waiter.start()
    wait_running(server.url, 2)
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    waiter.join(60)
    assert not t.is_alive() and not waiter.is_alive()
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert err["code"] == "server_shutting_down" and "grace period" in err["message"]
    r = blocking["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
    code, out = server.wait_exit()
    assert code == 0, out[-3000:]


def test_long_grace_lets_running_requests_finish_and_refuses_new_ones(spawn_server):
    server = spawn_server("server.shutdown_grace_s=60").wait_healthy()
    t, lines = start_stream(server.url, 120)
    server.proc.send_signal(signal.SIGTERM)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(50):  # the signal is handled asynchronously: wait until the server drains
            health = c.get("/health")
            if health.status_code == 503:
                break
            time.sleep(0.02)
        assert health.status_code == 503 and health.headers["retry-after"]
        refused = c.post("/v1/completions", json={**LONG, "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "server_shutting_down"
    t.join(120)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"  # finished within the grace period, no error event
    assert not any('"error"' in line for line in lines)
    code, out = server.wait_exit()
    assert code == 0, out[-3000:]
