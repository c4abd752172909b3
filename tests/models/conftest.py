"""Fixtures of the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache for one test: $NANOVLLM_CACHE points into its tmp_path."""
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
