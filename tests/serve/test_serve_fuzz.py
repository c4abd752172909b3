"""Fuzz the live server from its own OpenAPI schema (schemathesis: valid and invalid bodies): no 5xx, and
every error is OpenAI-shaped. Generated lengths are capped so the run stays a few seconds of CPU."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from nanovllm.serve.background import serve_model  # noqa: E402

ENGINE = dict(device="cpu", max_model_len=64, num_kvcache_blocks=128, max_num_seqs=16)
CAPS = {"max_tokens": 2, "max_completion_tokens": 2, "n": 2}  # bound the work of a valid request


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_model(tiny_model, "tiny", **ENGINE) as s:
        yield s


@pytest.fixture(scope="module")
def session():
    import requests  # schemathesis' own transport; one session keeps the connection alive between cases

    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server, session):
    if isinstance(case.body, dict):
        for key, cap in CAPS.items():
            value = case.body.get(key)
            if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > cap):
                case.body[key] = cap  # unset max tokens would run a chat to max_model_len
    response = case.call(base_url=server.url, session=session, timeout=60)
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
