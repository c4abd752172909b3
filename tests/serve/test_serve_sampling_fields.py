"""The sampling fields people send, through the HTTP server (CPU, tiny model): penalties, logit_bias,
min_tokens, include_stop_str_in_output, prompt_logprobs, echo (completions and chat), truncate_prompt_tokens
and user change the output as they say, and requests without them are unchanged."""

from __future__ import annotations

import json

import httpx
import pytest

from nanovllm.serve.background import serve_model

ENGINE = dict(device="cpu", max_model_len=128, num_kvcache_blocks=64, max_num_seqs=4)
GREEDY = dict(temperature=0, ignore_eos=True)
PROMPT = "the cat the cat the cat"


@pytest.fixture(scope="module")
def client(tiny_model):
    with serve_model(tiny_model, "tiny", **ENGINE) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        yield c


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, **GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def chat(client, messages=None, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": messages or [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 12, **GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_penalties_change_a_greedy_loop_and_zero_changes_nothing(client):
    base = complete(client, max_tokens=32)["text"]
    assert complete(client, max_tokens=32, presence_penalty=0, frequency_penalty=0, repetition_penalty=1,
                    logit_bias={})["text"] == base
    for field, value in (("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 2.0)):
        assert complete(client, max_tokens=32, **{field: value})["text"] != base, field
    chat_base = chat(client)["choices"][0]["message"]["content"]
    assert chat(client, frequency_penalty=2.0)["choices"][0]["message"]["content"] != chat_base


def test_logit_bias_forces_and_refuses(client):
    forced = complete(client, max_tokens=4, logit_bias={"1234": 100}, logprobs=0)
    assert len(set(forced["logprobs"]["tokens"])) == 1
    r = client.post("/v1/completions", json={"prompt": "x", "logit_bias": {"1": 1, "99999999": 1, "abc": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    assert "99999999" in r.json()["error"]["message"] and "abc" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "x", "logit_bias": {"1": 101}}).status_code == 400


def test_min_tokens_and_stop_strings(client):
    text = complete(client, max_tokens=12)["text"]
    stop = text[2:5]
    early = complete(client, max_tokens=12, stop=[stop])
    assert early["finish_reason"] == "stop" and early["text"] == text[:text.find(stop)]
    kept = complete(client, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert kept["text"] == early["text"] + stop
    late = complete(client, max_tokens=12, stop=[stop], min_tokens=10, logprobs=0)
    assert len(late["logprobs"]["tokens"]) >= 10


def test_prompt_logprobs_completion_and_chat(client):
    choice = complete(client, max_tokens=2, prompt_logprobs=2)
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) > 3
    for entry in plp[1:]:
        ranks = sorted(e["rank"] for e in entry.values())
        assert 2 <= len(entry) <= 3 and ranks[:2] == [1, 2] and all(e["logprob"] <= 0 for e in entry.values())
        assert all(e["decoded_token"] is not None for e in entry.values())
    body = chat(client, prompt_logprobs=0)
    assert body["prompt_logprobs"][0] is None and all(len(e) == 1 for e in body["prompt_logprobs"][1:])
    r = client.post("/v1/completions", json={"prompt": "x", "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_echo_completions(client):
    plain = complete(client, max_tokens=6, logprobs=1)
    echoed = complete(client, max_tokens=6, logprobs=1, echo=True)
    assert echoed["text"] == PROMPT + plain["text"]
    lp = echoed["logprobs"]
    n_prompt = len(lp["tokens"]) - len(plain["logprobs"]["tokens"])
    assert n_prompt > 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][n_prompt:] == plain["logprobs"]["tokens"]
    assert "".join(lp["tokens"][:n_prompt]) == PROMPT
    assert lp["text_offset"][n_prompt] == len(PROMPT)
    ids = complete(client, prompt=[785, 8251, 374], max_tokens=3, echo=True)
    assert ids["text"].startswith(complete(client, prompt=[785, 8251, 374], max_tokens=1, echo=True)["text"][:3])

    # streamed: the prompt first, then the same text as without echo
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "echo": True,
                                                        "stream": True, **GREEDY}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT + plain["text"]


def test_echo_chat_prepends_the_last_assistant_message(client):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]
    plain = chat(client, messages)["choices"][0]["message"]["content"]
    echoed = chat(client, messages, echo=True)["choices"][0]["message"]["content"]
    assert echoed == "Hello there" + plain
    user_last = [{"role": "user", "content": "hi"}]  # the reply's role differs: nothing to prepend (vLLM)
    assert chat(client, user_last, echo=True)["choices"][0]["message"]["content"] == \
        chat(client, user_last)["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "echo": True,
                                                             "stream": True, **GREEDY}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello there" + plain


def test_truncate_prompt_tokens(client):
    ids = list(range(300, 340))
    cut = complete(client, prompt=ids, truncate_prompt_tokens=8, max_tokens=5)
    assert cut["text"] == complete(client, prompt=ids[-8:], max_tokens=5)["text"]
    long = list(range(300, 300 + 500))  # longer than max_model_len: fits once truncated
    r = client.post("/v1/completions", json={"prompt": long, "truncate_prompt_tokens": 16, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 16
    text = "word " * 400
    r = client.post("/v1/completions", json={"prompt": text, "truncate_prompt_tokens": 16, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 16
    r = chat(client, [{"role": "user", "content": "hello " * 10}], truncate_prompt_tokens=5)
    assert r["usage"]["prompt_tokens"] == 5
    assert client.post("/v1/completions", json={"prompt": "x", "truncate_prompt_tokens": 0}).status_code == 400


def test_user_is_accepted(client):
    assert complete(client, user="someone@example.com")["text"] == complete(client)["text"]
