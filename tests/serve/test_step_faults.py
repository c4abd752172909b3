"""A model step that raises fails only the requests of that step (a 500, or an SSE error event then [DONE]),
frees their KV blocks and logs the traceback once; the engine goes on serving. Only a failure it cannot
recover from (a failing recovery, `max_step_failures` failing steps in a row) stops it: /health answers 503
and `python -m nanovllm.serve` exits 1."""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from nanovllm.serve.background import serve_model

ENGINE = dict(device="cpu", max_model_len=64, num_kvcache_blocks=64, max_num_seqs=4)
LONG = {"prompt": "hello there", "max_tokens": 40, "temperature": 0, "ignore_eos": True}


class FailingLaunch:
    """Wraps runner.launch: the next `times` calls after `arm()` raise."""

    def __init__(self, launch):
        self.launch, self.left = launch, 0

    def arm(self, times: int = 1) -> None:
        self.left = times

    def __call__(self, *args, **kwargs):
        if self.left:
            self.left -= 1
            raise RuntimeError("simulated kernel error")
        return self.launch(*args, **kwargs)


def wait_idle(engine, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_model(tiny_model, "tiny", **ENGINE) as s:
        yield s


@pytest.fixture
def faulty(server, monkeypatch):
    """(client, llm engine, FailingLaunch, free blocks at rest)."""
    llm = server.app.state.serve.engine.engine
    failing = FailingLaunch(llm.runner.launch)
    monkeypatch.setattr(llm.runner, "launch", failing)
    wait_idle(llm)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c, llm, failing, llm.block_manager.num_free_blocks


def check_step_failed(r: httpx.Response) -> None:
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "step_failed" and "simulated kernel error" in err["message"] and err["type"] == "server_error"


def test_failed_step_fails_its_request_and_the_engine_goes_on(faulty, caplog):
    c, llm, failing, free = faulty
    failing.arm()
    with caplog.at_level(logging.ERROR, logger="nanovllm.serve"):
        check_step_failed(c.post("/v1/completions", json=LONG))
    assert sum("model step failed" in r.getMessage() for r in caplog.records) == 1  # the traceback, once
    wait_idle(llm)
    assert llm.block_manager.num_free_blocks == free and not llm.requests
    assert c.get("/health").status_code == 200
    ok = c.post("/v1/completions", json=LONG)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 40
    wait_idle(llm)
    assert llm.block_manager.num_free_blocks == free


def test_failed_step_mid_stream_ends_with_error_event_and_done(faulty):
    c, llm, failing, free = faulty
    with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        failing.arm()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"code":"step_failed"' in rest[-2], rest[-3:]
    wait_idle(llm)
    assert llm.block_manager.num_free_blocks == free
    assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 3}).status_code == 200


def test_failed_step_fails_every_choice(faulty):
    """The n=3 choices of one request run in the failing step together: the request fails whole."""
    c, llm, failing, free = faulty
    failing.arm()
    check_step_failed(c.post("/v1/completions", json={**LONG, "n": 3}))
    wait_idle(llm)
    assert llm.block_manager.num_free_blocks == free and not llm.requests
    r = c.post("/v1/completions", json={**LONG, "n": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_consecutive_failures_stop_the_engine(tiny_model):
    with serve_model(tiny_model, "tiny", max_step_failures=2, **ENGINE) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:
        llm = s.app.state.serve.engine.engine
        failing = FailingLaunch(llm.runner.launch)
        llm.runner.launch = failing
        failing.arm(1)
        check_step_failed(c.post("/v1/completions", json=LONG))
        assert c.post("/v1/completions", json=LONG).status_code == 200  # a success resets the count
        failing.arm(2)
        check_step_failed(c.post("/v1/completions", json=LONG))
        check_step_failed(c.post("/v1/completions", json=LONG))  # the second in a row: fatal
        deadline = time.monotonic() + 10
        while c.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/health").status_code == 503
        r = c.post("/v1/completions", json=LONG)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_failing_recovery_stops_the_engine(tiny_model, monkeypatch):
    import nanovllm.serve.async_engine as async_engine

    def broken_recovery(engine):
        raise RuntimeError("simulated recovery failure")

    monkeypatch.setattr(async_engine, "fail_step_requests", broken_recovery)
    with serve_model(tiny_model, "tiny", **ENGINE) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        llm = s.app.state.serve.engine.engine
        failing = FailingLaunch(llm.runner.launch)
        llm.runner.launch = failing
        failing.arm(1)
        r = c.post("/v1/completions", json=LONG)
        assert r.status_code == 503 and "simulated recovery failure" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 503


SITECUSTOMIZE = """
from nanovllm.engine import model_runner

def _launch(self, *args, **kwargs):
    raise RuntimeError("simulated kernel error")

model_runner.ModelRunner.launch = _launch
"""


def test_entry_point_exits_nonzero_when_the_engine_dies(spawn_server, tmp_path):
    """A supervisor restarts what exits non-zero: every step fails (sitecustomize patches the runner in the child)."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    server = spawn_server("server.warmup=false", "server.max_step_failures=1", pythonpath=[tmp_path]).wait_healthy()
    r = httpx.post(server.url + "/v1/completions", json=LONG, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "step_failed"
    code, out = server.wait_exit()
    assert code == 1 and "the engine stopped" in out, out[-3000:]
