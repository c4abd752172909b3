"""schemathesis with every check (`st run --checks all`) against the live server, from its own OpenAPI schema:
no 5xx, responses match the schema (status codes, content types, bodies, headers such as Allow), every error is
OpenAI-shaped, schema-valid requests are accepted and schema-violating ones refused. Bounded by max_examples and
derandomized for CI; generated lengths are capped so a run stays seconds of CPU."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402

from nanovllm.serve.background import serve_model  # noqa: E402

ENGINE = dict(device="cpu", max_model_len=64, num_kvcache_blocks=128, max_num_seqs=16)
GENERATION = {"/v1/completions", "/v1/chat/completions"}
CAPS = {"max_tokens": 2, "max_completion_tokens": 2, "n": 2}  # bound the work of a generation request

load_all_checks()
ALL_CHECKS = CHECKS.get_all()
# The generation routes have rules across fields that JSON Schema cannot state (top_logprobs needs logprobs, a tool
# message needs its tool_call_id, min_tokens <= max_tokens, ...): their 400s are by design, so schemathesis'
# data-acceptance checks, which send schema-valid combinations, are left out there; every other check runs.
DATA_ACCEPTANCE = [c for c in ALL_CHECKS if c.__name__ in ("positive_data_acceptance", "negative_data_rejection")]


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_model(tiny_model, "tiny", **ENGINE) as s:
        yield s


@pytest.fixture(scope="module")
def session():
    import requests

    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_all_checks(case, server, session):
    excluded = []
    if case.path in GENERATION:
        excluded = DATA_ACCEPTANCE
        if isinstance(case.body, dict):
            for key, cap in CAPS.items():
                value = case.body.get(key)
                if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > cap):
                    case.body[key] = cap  # unset max tokens would run a chat to max_model_len
    response = case.call_and_validate(base_url=server.url, session=session, timeout=60, checks=ALL_CHECKS,
                                      excluded_checks=excluded)
    if response.status_code >= 400 and case.path != "/metrics":
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
