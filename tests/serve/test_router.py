"""The data-parallel front's pure parts: the affinity key of a request body, the router's choice, and the merge of
the replicas' Prometheus expositions."""

from __future__ import annotations

import json
import os

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nanovllm.serve.metrics_merge import merge_expositions
from nanovllm.serve.router import Router, affinity_key

LONG = "x" * 300


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_affinity_key_is_the_start_of_the_prompt():
    a = affinity_key(body(prompt=LONG + "one"), 256)
    assert a == affinity_key(body(prompt=LONG + "two"), 256) == affinity_key(body(prompt=[LONG + "3", "b"]), 256)
    assert a != affinity_key(body(prompt="y" + LONG), 256)
    chat = lambda text: body(messages=[{"role": "system", "content": LONG}, {"role": "user", "content": text}])
    assert affinity_key(chat("a"), 256) == affinity_key(chat("b"), 256)
    assert affinity_key(body(prompt=[1, 2, 3]), 256) == affinity_key(body(prompt=[[1, 2, 3]]), 256)
    assert affinity_key(b'{"prompt": "x",', 256) is None and affinity_key(body(input="x"), 256) is None
    assert affinity_key(b"[1]", 256) is None


def test_router_prefers_the_prefix_replica_until_it_is_much_busier():
    r = Router(2, slack=2)
    first, hit = r.choose([0, 1], key=7)
    assert not hit
    r.started(first)
    other = 1 - first
    assert r.choose([0, 1], key=8) == (other, False)  # a new prefix: the least busy
    for _ in range(2):
        assert r.choose([0, 1], key=7) == (first, True)
        r.started(first)
    assert r.outstanding[first] == 3 and r.outstanding[other] == 0
    assert r.choose([0, 1], key=7) == (other, False)  # 3 > 0 + slack: the key moves
    assert r.choose([0, 1], key=7) == (other, True)
    assert r.choose([first], key=7) == (first, False)  # its replica is down: another takes it
    r.finished(first)
    assert r.outstanding[first] == 2


def test_router_spreads_keyless_requests_by_outstanding_then_by_count():
    r = Router(3)
    picks = []
    for _ in range(6):
        i, _ = r.choose([0, 1, 2], key=None)
        r.started(i)
        r.finished(i)
        picks.append(i)
    assert sorted(picks) == [0, 0, 1, 1, 2, 2]


def exposition(value: float) -> str:
    reg = CollectorRegistry()
    Counter("nanovllm:prompt_tokens", "p", ["model_name"], registry=reg).labels("m").inc(value)
    Gauge("nanovllm:kv_cache_usage_perc", "k", ["model_name"], registry=reg).labels("m").set(value / 10)
    Histogram("nanovllm:e2e_seconds", "e", ["model_name"], registry=reg, buckets=(1, 2)).labels("m").observe(value)
    return generate_latest(reg).decode()


def test_merged_metrics_label_each_replica_and_total_them():
    merged = merge_expositions({0: exposition(1), 1: exposition(3)}).decode()
    samples = {(s.name, s.labels.get("replica", ""), s.labels.get("le")): s.value
               for f in text_string_to_metric_families(merged) for s in f.samples}
    assert samples[("nanovllm:prompt_tokens_total", "", None)] == 4
    assert samples[("nanovllm:prompt_tokens_total", "1", None)] == 3
    assert samples[("nanovllm:kv_cache_usage_perc", "", None)] == 0.2  # a fraction: the mean
    assert samples[("nanovllm:e2e_seconds_bucket", "", "1.0")] == 1
    assert samples[("nanovllm:e2e_seconds_bucket", "", "+Inf")] == 2
    assert samples[("nanovllm:e2e_seconds_count", "0", None)] == 1
    assert not any(name.endswith("_created") and replica == "" for name, replica, _ in samples)


def test_replica_commands_and_environments():
    from nanovllm.serve.replicas import replica_commands, replica_envs

    cmds = replica_commands(["model=tiny", "server.port=9000", "server.data_parallel=2", "server.host=0.0.0.0",
                             "+kernels=baseline"], 2, "/runs/x")
    assert cmds[1][1:] == ["-m", "nanovllm.serve", "model=tiny", "+kernels=baseline", "server.data_parallel=1",
                           "server.host=127.0.0.1", "hydra.run.dir=/runs/x/replica1"]
    envs = replica_envs(2, ["3", "5"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "5"] and envs[1]["NANOVLLM_REPLICA"] == "1"
    unpinned = replica_envs(2, [])  # no GPU: the front's environment as it is
    assert all(e.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES") for e in unpinned)
    with pytest.raises(ValueError, match="server.data_parallel=3 needs 3 GPUs"):
        replica_envs(3, ["0", "1"])


@pytest.mark.parametrize("override,message", [("server.data_parallel=0", "data_parallel"),
                                              ("server.affinity_slack=-1", "affinity_slack")])
def test_data_parallel_settings_are_checked(override, message):
    from hydra import compose, initialize_config_dir

    from nanovllm.serve.schema import check_serve_schema, register_serve_configs
    from tests.serve.conftest import ROOT

    register_serve_configs()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("serve", overrides=[override])
    with pytest.raises(ValueError, match=message):
        check_serve_schema(cfg)
