"""The small routes and headers clients rely on: GET /v1/models/{id} (the openai client's models.retrieve),
POST /tokenize and /detokenize (vLLM's shapes), GET /version, Retry-After on every 429 and 503, Allow on
every 405."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from nanovllm.serve.background import serve_model

ENGINE = dict(device="cpu", max_model_len=64, num_kvcache_blocks=64, max_num_seqs=1)


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_model(tiny_model, "tiny", max_queued_requests=1, **ENGINE) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_models_retrieve(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = oai.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model" and model.owned_by == "nanovllm"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]


def test_tokenize_and_detokenize_round_trip(client):
    r = client.post("/tokenize", json={"prompt": "Hello world"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"tokens", "count", "max_model_len"}
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 64
    back = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "Hello world"}
    plain = client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == body["tokens"][-len(plain["tokens"]):]


def test_tokenize_counts_beyond_max_model_len(client):
    """The client compares count with max_model_len: a prompt too long to generate from is still counted."""
    body = client.post("/tokenize", json={"prompt": "word " * 5000}).json()
    assert body["count"] == len(body["tokens"]) > body["max_model_len"] == 64


def test_tokenize_messages_uses_the_chat_template(client, server):
    tokenizer = server.app.state.serve.tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    r = client.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(expected, add_special_tokens=False)
    assert r.json()["tokens"] == ids
    with_special = client.post("/tokenize", json={"messages": messages, "add_special_tokens": True}).json()["tokens"]
    assert with_special == tokenizer.encode(expected, add_special_tokens=True)


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, None),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
    ("/tokenize", b'{"prompt": "hi \\ud800"}', "prompt"),  # a lone surrogate, as JSON escapes it
    ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [True, 1.0]}, "tokens"),
    ("/detokenize", {"tokens": [1] * 65}, "tokens"),  # more than max_model_len
    ("/tokenize", {"prompt": "x", "return_token_strs": True}, "return_token_strs"),
])
def test_tokenize_bad_input(client, path, body, param):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"].startswith(param)), err


def test_version(client):
    r = client.get("/version")
    assert r.status_code == 200 and r.json()["version"]


@pytest.mark.parametrize("method,path,allowed", [("GET", "/v1/completions", "POST"),
                                                 ("DELETE", "/v1/chat/completions", "POST"),
                                                 ("POST", "/v1/models", "GET"), ("PUT", "/health", "GET"),
                                                 ("GET", "/tokenize", "POST")])
def test_405_names_the_allowed_methods(client, method, path, allowed):
    r = client.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allowed
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_429_has_retry_after(client, server):
    """One sequence runs (max_num_seqs=1), one waits (max_queued_requests=1): the next request gets 429."""
    engine = server.app.state.serve.engine
    body = {"prompt": "Hello", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as running, \
            client.stream("POST", "/v1/completions", json=body) as waiting:
        assert running.status_code == waiting.status_code == 200
        deadline = time.monotonic() + 20
        while engine.stats.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "too_many_requests"


class BosTokenizer:
    """Adds BOS=1 before and EOS=2 after, as Llama-style tokenizers do."""

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return [1, *ids, 2] if add_special_tokens else ids


def test_special_tokens_added_and_removed():
    from nanovllm.serve.utility_routes import SpecialTokens

    special = SpecialTokens(BosTokenizer())
    assert (special.prefix, special.suffix) == ([1], [2])
    assert special.add([5, 6]) == [1, 5, 6, 2] and special.remove([1, 5, 6, 2]) == [5, 6]
    assert special.remove([5, 6]) == [5, 6]
