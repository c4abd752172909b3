"""Structured outputs through a real server on 127.0.0.1: OpenAI's response_format (with the openai client's
`chat.completions.parse` and LangChain's `with_structured_output`) and vLLM's structured_outputs / guided_*."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from nanovllm.serve.background import serve_model

ENGINE = dict(device="cpu", dtype="float32", max_model_len=512, num_kvcache_blocks=128, max_num_seqs=16)
MESSAGES = [{"role": "user", "content": "Tell me about a city."}]


class City(BaseModel):
    """Every field bounded, so the tiny random model reaches the end of the object."""
    name: str = Field(max_length=8)
    population_millions: int = Field(ge=0, le=40)
    capital: bool
    continent: Literal["Europe", "Asia", "Africa"]


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_model(str(tiny_model), "tiny", **ENGINE) as s:
        yield s


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=5)])
def test_openai_parse_with_pydantic_model(openai_client, sampling):
    r = openai_client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=City, **sampling)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    City.model_validate_json(choice.message.content)


def test_openai_beta_parse(openai_client):
    r = openai_client.beta.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=City,
                                                  temperature=0.7, seed=1, n=2)
    assert [isinstance(c.message.parsed, City) for c in r.choices] == [True, True]


def test_langchain_with_structured_output(server):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key="unused", temperature=0, max_retries=0)
    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("Tell me about a city.")
        assert isinstance(city, City), method


def test_json_object_and_streamed_json_schema(http):
    schema = City.model_json_schema()
    body = dict(messages=MESSAGES, temperature=0, stream=True,
                response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    jsonschema.validate(json.loads(text), schema)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    r = http.post("/v1/chat/completions", json=dict(messages=MESSAGES, max_tokens=16, temperature=0,
                                                    response_format={"type": "json_object"}))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("{")


def test_vllm_guided_fields_on_both_endpoints(http):
    schema = City.model_json_schema()
    cases = [({"guided_json": schema}, lambda t: jsonschema.validate(json.loads(t), schema)),
             ({"structured_outputs": {"json": schema}}, lambda t: jsonschema.validate(json.loads(t), schema)),
             ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) or 1 / 0),
             ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda t: t in ("alpha", "beta") or 1 / 0),
             ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down") or 1 / 0),
             ({"guided_grammar": 'root ::= "x" [0-9]'}, lambda t: re.fullmatch("x[0-9]", t) or 1 / 0)]
    for fields, check in cases:
        chat = http.post("/v1/chat/completions", json=dict(messages=MESSAGES, temperature=1.0, seed=3, **fields))
        assert chat.status_code == 200, (fields, chat.text)
        check(chat.json()["choices"][0]["message"]["content"])
        done = http.post("/v1/completions", json=dict(prompt="x =", max_tokens=200, temperature=0, **fields))
        assert done.status_code == 200, (fields, done.text)
        check(done.json()["choices"][0]["text"])


@pytest.mark.parametrize("fields,param", [
    ({"guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_bad_constraints_are_400s_naming_the_field(http, fields, param):
    r = http.post("/v1/chat/completions", json=dict(messages=MESSAGES, **fields))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert http.get("/health").status_code == 200


def test_missing_grammar_library_is_a_501_and_the_server_goes_on(http, monkeypatch):
    """xgrammar that does not import (a wheel without its native dependency): a constrained request gets a 501
    naming the field and the reason, and plain requests are served as before."""
    import sys

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError
    r = http.post("/v1/chat/completions", json=dict(messages=MESSAGES, response_format={"type": "json_object"}))
    assert r.status_code == 501, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and "xgrammar" in error["message"], r.text
    assert error["code"] == "structured_outputs_unavailable"
    ok = http.post("/v1/chat/completions", json=dict(messages=MESSAGES, max_tokens=3))
    assert ok.status_code == 200 and http.get("/health").status_code == 200
