"""Prometheus metrics of one server (app). Each app gets its own CollectorRegistry, so tests can build
several apps in one process; docs/deployment.md explains each metric.

Two sets: the `nanovllm_*` metrics, and vLLM's metric set under the `nanovllm:` prefix (the same names as
`vllm:*`, with a `model_name` label) that docs/grafana-dashboard.json charts: a vLLM dashboard works by
swapping the prefix. `RequestTimes` holds the per-request timestamps those histograms are made from.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds) that cover a GPU's milliseconds and a CPU's seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
_PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0  # generated tok/s is averaged over this trailing window
PREFIX = "nanovllm:"


def length_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to the first at or above `max_len` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            out.append(m * scale)
            if m * scale >= max_len:
                return out
        scale *= 10


class RequestTimes:
    """perf_counter timestamps of one engine request: arrival (accepted by the server), scheduled (first in a
    batch), first token and last token (as handed to the HTTP layer)."""
    __slots__ = ("arrival", "scheduled", "first_token", "last_token")

    def __init__(self, arrival: float):
        self.arrival, self.scheduled, self.first_token, self.last_token = arrival, None, None, None


class Metrics:
    def __init__(self, model_name: str = "", max_model_len: int = 1 << 20):
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
        self.memory = Gauge("nanovllm_memory_bytes", "Device memory by kind, at startup: weights, kv_cache, "
                            "activations (the warm-up's peak), workspace (kernel scratch), other (CUDA: the rest "
                            "the allocator holds, CUDA graphs included)", ["kind"], registry=r)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW_S
        self._add_vllm_set(model_name, max_model_len)

    def _add_vllm_set(self, model_name: str, max_model_len: int) -> None:
        r, label = self.registry, ["model_name"]

        def one(metric):  # the child of this server's model
            return metric.labels(model_name)

        def hist(name, doc, buckets):
            return one(Histogram(PREFIX + name, doc, label, buckets=buckets, registry=r))

        def count(name, doc):
            return one(Counter(PREFIX + name, doc, label, registry=r))

        def gauge(name, doc):
            return one(Gauge(PREFIX + name, doc, label, registry=r))

        lengths = length_buckets(max_model_len)
        self.v_running = gauge("num_requests_running", "Sequences in the running batch")
        self.v_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled")
        self.v_swapped = gauge("num_requests_swapped", "Preempted sequences waiting with their KV blocks swapped to "
                               "the KV host tier")
        self.v_kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.v_preemptions = count("num_preemptions", "Sequences preempted (their KV blocks freed, recomputed later)")
        self.v_prefix_queries = count("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.v_prefix_hits = count("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.v_prefix_host_hits = count("prefix_cache_host_hits", "Prompt tokens found in the prefix cache's KV "
                                        "host tier (part of prefix_cache_hits)")
        self.v_prompt_tokens = count("prompt_tokens", "Prompt tokens of finished requests")
        self.v_generation_tokens = count("generation_tokens", "Generated tokens")
        self.v_success = Counter(PREFIX + "request_success", "Finished requests by finish reason: stop, length, "
                                 "abort (client went away), error (a failed step, the engine stopping, shutdown)",
                                 label + ["finished_reason"], registry=r)
        self._model_name = model_name
        self.v_prompt_len = hist("request_prompt_tokens", "Prompt length of finished requests (tokens)", lengths)
        self.v_generation_len = hist("request_generation_tokens", "Generated tokens per finished request", lengths)
        self.v_ttft = hist("time_to_first_token_seconds", "Arrival to first token", _TTFT_BUCKETS)
        self.v_itl = hist("inter_token_latency_seconds", "Time between consecutive tokens", _ITL_BUCKETS)
        self.v_e2e = hist("e2e_request_latency_seconds", "Arrival to last token", _E2E_BUCKETS)
        self.v_queue = hist("request_queue_time_seconds", "Arrival to first scheduled (waiting for a batch slot "
                            "and for the tokenizer)", _PHASE_BUCKETS)
        self.v_prefill = hist("request_prefill_time_seconds", "First scheduled to first token", _PHASE_BUCKETS)
        self.v_decode = hist("request_decode_time_seconds", "First token to last token", _PHASE_BUCKETS)
        self.v_inference = hist("request_inference_time_seconds", "First scheduled to last token", _PHASE_BUCKETS)
        self._engine_totals = (0, 0, 0, 0)  # preemptions, prefix-cache queries, hits, host-tier hits already counted
        self.v_spec_drafts = count("spec_decode_num_drafts", "Speculative decoding: verify steps of a sequence "
                                   "with at least one drafted token")
        self.v_spec_draft_tokens = count("spec_decode_num_draft_tokens", "Speculative decoding: drafted tokens")
        self.v_spec_accepted = count("spec_decode_num_accepted_tokens", "Speculative decoding: drafted tokens "
                                     "the target model accepted")
        self.v_spec_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos", "Speculative decoding: "
                                      "accepted tokens by draft position (0 first)", label + ["position"],
                                      registry=r)
        self._spec_totals: tuple = (0, 0, 0, ())

    def set_memory(self, report) -> None:
        """The memory gauges from the engine's MemoryReport (engine/memory_report.py)."""
        for kind, nbytes in report.gauges().items():
            self.memory.labels(kind).set(nbytes)

    def count_finished(self, reason: str) -> None:
        """Success by finish reason; `error` for requests the server failed."""
        self.v_success.labels(self._model_name, reason).inc()

    def count_failed(self) -> None:
        self.requests.labels("error").inc()
        self.count_finished("error")

    def observe_tokens(self, t: RequestTimes, n: int, now: float) -> None:
        """`n` new tokens of a request reached the HTTP layer at `now`."""
        if t.first_token is None:
            t.first_token = now
            self.ttft.observe(now - t.arrival)
            self.v_ttft.observe(now - t.arrival)
        else:
            self.itl.observe((now - t.last_token) / n)
            self.v_itl.observe((now - t.last_token) / n)
        t.last_token = now
        self.add_generated(n, now)
        self.v_generation_tokens.inc(n)

    def observe_finished(self, t: RequestTimes, reason: str, prompt_tokens: int, completion_tokens: int,
                         now: float) -> None:
        self.requests.labels(reason).inc()
        self.count_finished(reason)
        self.prompt_tokens.inc(prompt_tokens)
        self.v_prompt_tokens.inc(prompt_tokens)
        self.v_prompt_len.observe(prompt_tokens)
        self.v_generation_len.observe(completion_tokens)
        self.e2e.observe(now - t.arrival)
        self.v_e2e.observe(now - t.arrival)
        scheduled = t.scheduled if t.scheduled is not None else t.arrival
        first = t.first_token if t.first_token is not None else now
        self.v_queue.observe(scheduled - t.arrival)
        self.v_prefill.observe(first - scheduled)
        self.v_decode.observe(now - first)
        self.v_inference.observe(now - scheduled)

    def sync_engine_totals(self, preemptions: int, prefix_queries: int, prefix_hits: int,
                           prefix_host_hits: int = 0) -> None:
        """Advance the counters the engine keeps as running totals."""
        old = self._engine_totals
        self.v_preemptions.inc(max(preemptions - old[0], 0))
        self.v_prefix_queries.inc(max(prefix_queries - old[1], 0))
        self.v_prefix_hits.inc(max(prefix_hits - old[2], 0))
        self.v_prefix_host_hits.inc(max(prefix_host_hits - old[3], 0))
        self._engine_totals = (preemptions, prefix_queries, prefix_hits, prefix_host_hits)

    def sync_spec_totals(self, drafts: int, draft_tokens: int, accepted: int, per_position: tuple[int, ...]) -> None:
        """Advance the speculative-decoding counters to the engine's running totals."""
        old = self._spec_totals
        self.v_spec_drafts.inc(max(drafts - old[0], 0))
        self.v_spec_draft_tokens.inc(max(draft_tokens - old[1], 0))
        self.v_spec_accepted.inc(max(accepted - old[2], 0))
        for pos, n in enumerate(per_position):
            before = old[3][pos] if pos < len(old[3]) else 0
            if n > before:
                self.v_spec_per_pos.labels(self._model_name, str(pos)).inc(n - before)
        self._spec_totals = (drafts, draft_tokens, accepted, tuple(per_position))

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
        usage = 1 - stats.free_blocks / stats.num_blocks if stats.num_blocks else 0.0
        for gauge, value in ((self.waiting, stats.waiting), (self.running, stats.running), (self.kv_usage, usage),
                             (self.v_waiting, stats.waiting), (self.v_running, stats.running),
                             (self.v_kv_usage, usage), (self.v_swapped, stats.swapped)):
            gauge.set(value)
        return generate_latest(self.registry)
