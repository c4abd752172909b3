"""pytest-benchmark suites (not collected by the CPU CI: testpaths is tests/). Run on a CUDA machine:

    python -m pytest benchmarks -m gpu --benchmark-json=bench-results/bench.json

pytest-benchmark's storage defaults to $NANOVLLM_CACHE/benchmarks (else ~/.cache/nanovllm/benchmarks; see the
repository's conftest.py). Results are also upserted into a CSV keyed by GPU name (Liger-Kernel style):
$NANOVLLM_BENCH_CSV, else decode_step.csv in that storage folder. NANOVLLM_BENCH_OVERRIDES holds Hydra
overrides for every engine ("model=tiny device=cpu engine=cpu_small" runs the suite on the CPU).
"""

from __future__ import annotations

import csv
import os
import shlex
from pathlib import Path

import pytest
import torch

KEY = ("gpu_name", "preset", "context", "metric_name")
COLUMNS = (*KEY, "metric_unit", "y_50", "y_20", "y_80", "rounds", "git_sha", "timestamp")


def overrides() -> list[str]:
    return shlex.split(os.environ.get("NANOVLLM_BENCH_OVERRIDES", ""))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or "device=cpu" in overrides():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (or NANOVLLM_BENCH_OVERRIDES with device=cpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def upsert_csv(path: Path, rows: list[dict]) -> None:
    """Replace rows with the same key (a rerun on the same GPU), keep everyone else's."""
    kept = []
    if path.is_file():
        with path.open(newline="") as f:
            new_keys = {tuple(str(r[k]) for k in KEY) for r in rows}
            kept = [r for r in csv.DictReader(f) if tuple(r[k] for k in KEY) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept + rows)


@pytest.fixture(scope="session")
def bench_overrides() -> list[str]:
    return overrides()


def csv_path(config) -> Path | None:
    """$NANOVLLM_BENCH_CSV, else decode_step.csv beside pytest-benchmark's saved runs when they are files."""
    if os.environ.get("NANOVLLM_BENCH_CSV"):
        return Path(os.environ["NANOVLLM_BENCH_CSV"])
    folder = config.getoption("benchmark_storage").removeprefix("file://")
    return None if "://" in folder else Path(folder) / "decode_step.csv"


@pytest.fixture(scope="session")
def csv_rows(request):
    """Tests append rows; they are written once, at the end of the session."""
    rows: list[dict] = []
    yield rows
    path = csv_path(request.config)
    if rows and path:
        upsert_csv(path, rows)
