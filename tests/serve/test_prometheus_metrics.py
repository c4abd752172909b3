"""/metrics exposes vLLM's metric set under `nanovllm:` with a `model_name` label, and the values follow
the requests served: lengths, phase times, prefix-cache hits, success by finish reason."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanovllm.serve.background import serve_model
from nanovllm.serve.metrics import length_buckets

ROOT = Path(__file__).resolve().parents[2]
ENGINE = dict(device="cpu", max_model_len=128, num_kvcache_blocks=64, kvcache_block_size=16, max_num_seqs=4)

HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
              "request_inference_time_seconds", "request_prompt_tokens", "request_generation_tokens"]
COUNTERS = ["num_preemptions", "prefix_cache_queries", "prefix_cache_hits", "prefix_cache_host_hits", "prompt_tokens",
            "generation_tokens", "request_success"]
GAUGES = ["num_requests_running", "num_requests_waiting", "num_requests_swapped", "kv_cache_usage_perc"]


@pytest.fixture(scope="module")
def scraped(tiny_model):
    with serve_model(tiny_model, "tiny", **ENGINE) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        prompt = " ".join(f"word{i}" for i in range(30))  # several full blocks: the second time they are cached
        for _ in range(2):
            assert c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "ignore_eos": True}).is_success
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=chat) as r:
            assert r.status_code == 200 and list(r.iter_lines())
        text = c.get("/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families, name: str, suffix: str = "") -> list:
    return [s for s in families["nanovllm:" + name].samples if s.name == "nanovllm:" + name + suffix]


def test_every_vllm_metric_is_exposed_with_the_model_name(scraped):
    for name in HISTOGRAMS + COUNTERS + GAUGES:
        assert "nanovllm:" + name in scraped, name
        for s in scraped["nanovllm:" + name].samples:
            assert s.labels["model_name"] == "tiny", s
    for name in HISTOGRAMS:
        assert scraped["nanovllm:" + name].type == "histogram"
        (count,) = samples(scraped, name, "_count")
        assert count.value == (2 + 2 + 1 if name == "inter_token_latency_seconds" else 3), name  # gaps / requests
    for name in COUNTERS:
        assert scraped["nanovllm:" + name].type == "counter"


def test_values_follow_the_requests(scraped):
    (prompt_sum,) = samples(scraped, "request_prompt_tokens", "_sum")
    (prompt_total,) = samples(scraped, "prompt_tokens", "_total")
    assert prompt_sum.value == prompt_total.value > 60
    (generated,) = samples(scraped, "generation_tokens", "_total")
    assert generated.value == 3 + 3 + 2
    (queries,) = samples(scraped, "prefix_cache_queries", "_total")
    (hits,) = samples(scraped, "prefix_cache_hits", "_total")
    assert queries.value == prompt_total.value and hits.value >= 16  # the repeated prompt's full blocks
    success = {s.labels["finished_reason"]: s.value for s in samples(scraped, "request_success", "_total")}
    assert success["length"] == 3
    assert [s.value for s in samples(scraped, "num_requests_running")] == [0]
    assert [s.value for s in samples(scraped, "kv_cache_usage_perc")] == [0]
    assert [s.value for s in samples(scraped, "num_requests_swapped")] == [0]


def test_length_buckets():
    assert length_buckets(64) == [1, 2, 5, 10, 20, 50, 100]
    assert length_buckets(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def test_grafana_dashboard_charts_the_metrics():
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for name in HISTOGRAMS + COUNTERS + GAUGES:
        assert "nanovllm:" + name in exprs, name
    assert "$model_name" in exprs
