"""One batch-1 decode step per kernel preset, with pytest-benchmark (benchmark.pedantic): a request is
prefilled at a 128-token context, then each round is one engine step that decodes one token.

    python -m pytest benchmarks/test_bench_decode.py -m gpu          # presets: $NANOVLLM_BENCH_PRESETS
"""

from __future__ import annotations

import datetime
import os

import pytest

from nanovllm.bench import presets
from nanovllm.bench.latency import percentile
from nanovllm.bench.steps import DecodeSteps
from nanovllm.provenance import git_sha

pytestmark = pytest.mark.gpu
PRESETS = [p for p in os.environ.get("NANOVLLM_BENCH_PRESETS", "baseline,compile").split(",") if p]
CONTEXT = 128
ROUNDS, WARMUP = int(os.environ.get("NANOVLLM_BENCH_ROUNDS", 200)), 20


@pytest.fixture(scope="module", params=PRESETS)
def engine(request, bench_overrides):
    cfg = presets.compose_config(request.param, bench_overrides)
    llm = presets.build_llm(cfg, min_model_len=CONTEXT + ROUNDS + WARMUP + 64)
    yield request.param, llm
    presets.release(llm)


def test_decode_step(benchmark, engine, csv_rows):
    preset, llm = engine
    with DecodeSteps(llm, CONTEXT, max_steps=ROUNDS + WARMUP + 8) as steps:
        benchmark.pedantic(steps.step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    data = [t * 1e3 for t in benchmark.stats.stats.data]  # ms per step = ms per token at batch 1
    median = percentile(data, 50)
    benchmark.extra_info.update(preset=preset, gpu=llm.device_name, context=CONTEXT, decode_tok_s=1e3 / median,
                                kernel_table=llm.kernel_table)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = dict(gpu_name=llm.device_name, preset=preset, context=CONTEXT, rounds=len(data), git_sha=git_sha(),
                  timestamp=now)
    csv_rows.append(dict(common, metric_name="decode_step", metric_unit="ms", y_50=median,
                         y_20=percentile(data, 20), y_80=percentile(data, 80)))
    # tok/s from the same quantiles: the 20th percentile of time is the 80th of speed
    csv_rows.append(dict(common, metric_name="decode_tok_s", metric_unit="tok/s", y_50=1e3 / median,
                         y_20=1e3 / percentile(data, 80), y_80=1e3 / percentile(data, 20)))
    assert median > 0
