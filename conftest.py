"""pytest settings shared by every test tree of the checkout (tests/, benchmarks/): plugins keep their files
outside the source tree.

pytest-benchmark opens its storage when pytest starts (creating `./.benchmarks` by default) and Hypothesis
keeps its example database and constants cache in `./.hypothesis`. Both go under $NANOVLLM_CACHE (else
~/.cache/nanovllm) instead: `benchmarks/` and `hypothesis/`. `--benchmark-storage=...` and
$HYPOTHESIS_STORAGE_DIRECTORY still choose other places.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PYTEST_BENCHMARK_DEFAULT_STORAGE = "file://./.benchmarks"


def state_dir() -> Path:
    """The folder under which test plugins keep what outlives a run: nanovllm's cache folder."""
    return Path(os.environ.get("NANOVLLM_CACHE") or Path.home() / ".cache" / "nanovllm").expanduser()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # tryfirst: pytest-benchmark's pytest_configure (trylast) opens the storage named by then
    if getattr(config.option, "benchmark_storage", None) == PYTEST_BENCHMARK_DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{state_dir() / 'benchmarks'}"
    if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        try:
            from hypothesis.configuration import set_hypothesis_home_dir
        except ImportError:
            return
        set_hypothesis_home_dir(state_dir() / "hypothesis")
