"""The server with speculative decoding: `usage.speculative_decoding` per response (streamed or not), the
spec_decode counters under `nanovllm:` in /metrics, and the same greedy text as without speculation."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanovllm.serve.background import serve_model

ENGINE = dict(device="cpu", max_model_len=128, num_kvcache_blocks=64, kvcache_block_size=16, max_num_seqs=4)
PROMPT = " ".join(["alpha beta gamma delta"] * 6)
BODY = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def responses(tiny_model):
    with serve_model(tiny_model, "tiny", **ENGINE) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        plain = c.post("/v1/completions", json=BODY).json()
    spec = {"method": "draft_model", "model": str(tiny_model), "num_speculative_tokens": 3}
    with serve_model(tiny_model, "tiny", speculative_config=spec, **ENGINE) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        whole = c.post("/v1/completions", json=BODY).json()
        stream_body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/completions", json=stream_body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        metrics = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    return plain, whole, events, metrics


def test_same_text_and_usage(responses):
    plain, whole, events, _ = responses
    assert whole["choices"][0]["text"] == plain["choices"][0]["text"]
    assert plain["usage"]["speculative_decoding"] is None
    spec = whole["usage"]["speculative_decoding"]
    # the target drafts for itself, every draft kept: the prompt's step gives 1 token, then steps of 3 drafts
    # plus one give 4, 4, and 3 (2 drafts: no draft past max_tokens)
    assert spec == {"num_drafts": 3, "num_draft_tokens": 8, "num_accepted_tokens": 8,
                    "mean_accepted_length": pytest.approx(1 + 8 / 3)}
    assert events[-1]["usage"] == whole["usage"]


def test_metrics(responses):
    metrics = responses[3]

    def total(name):
        return sum(s.value for s in metrics["nanovllm:" + name].samples if s.name.endswith("_total"))

    assert total("spec_decode_num_drafts") == 6
    assert total("spec_decode_num_draft_tokens") == total("spec_decode_num_accepted_tokens") == 16
    per_pos = {s.labels["position"]: s.value for s in metrics["nanovllm:spec_decode_num_accepted_tokens_per_pos"]
               .samples if s.name.endswith("_total")}
    assert per_pos == {"0": 6, "1": 6, "2": 4}
