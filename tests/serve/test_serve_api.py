"""The OpenAI-compatible server against a real uvicorn on 127.0.0.1: responses, streaming, n, logprobs,
stop, seed, chat templates (Qwen3 thinking on/off), usage, metrics, and the openai / LangChain clients."""

from __future__ import annotations

import json

import httpx
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.serve.app import create_app
from nanovllm.serve.background import BackgroundServer

PROMPT = "The capital of France is"
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, num_kvcache_blocks=128, max_num_seqs=16)


@pytest.fixture(scope="module")
def served(tiny_model):
    """(server, offline greedy reference): the reference comes from the offline API on the same engine,
    before the server's thread takes the engine over."""
    llm = LLM(str(tiny_model), **ENGINE)
    ref = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    with BackgroundServer(create_app(llm.engine, "tiny")) as server:
        yield server, ref
    llm.close()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0].url, timeout=60) as c:
        yield c


def post(client, path, **body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(client, path, **body) -> list:
    """The decoded `data:` events of a streamed response; the last one must be [DONE]."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == ENGINE["max_model_len"]


def test_completion_matches_offline_api(served, client):
    server, ref = served
    r = post(client, "/v1/completions", model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == "tiny"
    assert r["choices"][0]["text"] == ref["text"] and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 8 and r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 8


def test_batch_of_prompts_times_n(client):
    ids = [9707, 11, 1879]
    r = post(client, "/v1/completions", prompt=[PROMPT, "Hello"], n=2, max_tokens=3, temperature=0)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"] == r["choices"][1]["text"]  # greedy: both choices of a prompt agree
    single = post(client, "/v1/completions", prompt=PROMPT, max_tokens=3, temperature=0)
    hello = post(client, "/v1/completions", prompt="Hello", max_tokens=3, temperature=0)
    # a prompt counts once in usage however many choices it has
    assert r["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"] + hello["usage"]["prompt_tokens"]
    assert r["usage"]["completion_tokens"] == 12
    by_ids = post(client, "/v1/completions", prompt=ids, max_tokens=2, temperature=0)
    assert by_ids["usage"]["prompt_tokens"] == 3


def test_completion_logprobs(client):
    r = post(client, "/v1/completions", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(x <= 0 for x in lp["token_logprobs"]) and all(1 <= len(t) <= 2 for t in lp["top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - x) < 1e-5 for t, x in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def test_stop_string(client):
    full = post(client, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 1]
    cut = post(client, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut["choices"][0]["text"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_seed_makes_sampling_reproducible(client):
    body = dict(prompt=PROMPT, max_tokens=4, temperature=1.0, seed=1234, n=2)
    a, b = (post(client, "/v1/completions", **body)["choices"] for _ in range(2))
    assert [c["text"] for c in a] == [c["text"] for c in b]
    assert a[0]["text"] != a[1]["text"]  # choice j samples with seed + j


def test_chat_thinking_switch(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    on = post(client, "/v1/chat/completions", messages=msgs, max_tokens=2, temperature=0)
    off = post(client, "/v1/chat/completions", messages=msgs, max_completion_tokens=2, temperature=0,
               chat_template_kwargs={"enable_thinking": False})
    assert on["object"] == "chat.completion" and on["choices"][0]["message"]["role"] == "assistant"
    # thinking off pre-fills an empty <think></think> block into the prompt
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"]
    assert off["usage"]["completion_tokens"] == 2


def test_chat_content_parts_and_logprobs(client):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    r = post(client, "/v1/chat/completions", messages=msgs, max_tokens=3, temperature=0, logprobs=True,
             top_logprobs=2)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 3
    for t in content:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 and isinstance(t["bytes"], list)
    plain = post(client, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi there"}], max_tokens=3,
                 temperature=0)
    assert plain["choices"][0]["message"]["content"] == r["choices"][0]["message"]["content"]


def test_streamed_completion_equals_whole(client):
    body = dict(prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    whole = post(client, "/v1/completions", **body)
    events = sse_events(client, "/v1/completions", **body, stream_options={"include_usage": True})
    assert "".join(c["text"] for e in events for c in e["choices"]) == whole["choices"][0]["text"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_streamed_chat_chunks(client):
    events = sse_events(client, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], n=2,
                        max_tokens=3, temperature=0)
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events)
    first = {e["choices"][0]["index"]: e["choices"][0] for e in reversed(events)}
    assert all(first[i]["delta"] == {"role": "assistant", "content": ""} for i in (0, 1))
    finals = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1] and all(c["finish_reason"] == "length" for c in finals)


def test_openai_client(served):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in c.models.list()] == ["tiny"]
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == served[1]["text"]
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                     temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4o", prompt="x")


def test_langchain_chat_openai(served):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=served[0].url + "/v1", api_key="unused", model="tiny", max_tokens=4, temperature=0,
                     max_retries=0, stream_usage=True)
    whole = llm.invoke("Hello")
    assert whole.usage_metadata["output_tokens"] == 4
    chunks = list(llm.stream("Hello"))
    assert "".join(c.content for c in chunks) == whole.content
    assert sum(chunks[1:], chunks[0]).usage_metadata["output_tokens"] == 4


def test_metrics(client):
    post(client, "/v1/completions", prompt=PROMPT, max_tokens=3, temperature=0)
    text = client.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['nanovllm_requests_total{status="length"}'] >= 1
    assert values["nanovllm_time_to_first_token_seconds_count"] >= 1
    assert values["nanovllm_inter_token_latency_seconds_count"] >= 1
    assert values["nanovllm_generation_tokens_total"] >= 3
    assert values["nanovllm_generation_tokens_per_second"] > 0
    assert values["nanovllm_num_requests_running"] == 0 and values["nanovllm_num_requests_waiting"] == 0
    assert values["nanovllm_kv_cache_usage_ratio"] == 0  # idle: every block is free again
    assert values['nanovllm_memory_bytes{kind="weights"}'] > 0 and values['nanovllm_memory_bytes{kind="kv_cache"}'] > 0
