"""Prometheus metrics of one server (app). Each app gets its own CollectorRegistry, so tests can build
several apps in one process; docs/deployment.md explains each metric."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds) that cover a GPU's milliseconds and a CPU's seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0  # generated tok/s is averaged over this trailing window


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nanovllm_requests", "Finished engine requests (one per choice) by status: "
                                "stop, length, abort (client cancelled or disconnected), error; and HTTP "
                                "requests rejected with a 4xx (rejected)", ["status"], registry=r)
        self.waiting = Gauge("nanovllm_num_requests_waiting", "Requests queued for a batch slot", registry=r)
        self.running = Gauge("nanovllm_num_requests_running", "Sequences in the running batch", registry=r)
        self.kv_usage = Gauge("nanovllm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)",
                              registry=r)
        self.ttft = Histogram("nanovllm_time_to_first_token_seconds", "Arrival to first token, per request",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("nanovllm_inter_token_latency_seconds", "Time between consecutive tokens of a "
                             "request", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("nanovllm_e2e_request_latency_seconds", "Arrival to last token, per finished "
                             "request", buckets=_E2E_BUCKETS, registry=r)
        self.generated = Counter("nanovllm_generation_tokens", "Generated (completion) tokens", registry=r)
        self.prompt_tokens = Counter("nanovllm_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.tok_s = Gauge("nanovllm_generation_tokens_per_second",
                           f"Generated tokens per second over the last {RATE_WINDOW_S:g} s", registry=r)
        self.tok_s.set_function(self.generation_rate)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW_S

    def add_generated(self, n: int, now: float) -> None:
        self.generated.inc(n)
        self._recent.append((now, n))

    def generation_rate(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self, stats) -> bytes:
        """The text exposition, with the engine gauges taken from the latest EngineStats snapshot."""
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_usage.set(1 - stats.free_blocks / stats.num_blocks if stats.num_blocks else 0.0)
        return generate_latest(self.registry)
