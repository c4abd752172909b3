"""`python -m nanovllm.ops` reads at 80 columns: one line per (op, backend), nothing wider than the terminal."""

from __future__ import annotations

from nanovllm.ops import OPS
from nanovllm.ops.__main__ import main


def test_listing_fits_80_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    main([])
    out = capsys.readouterr().out
    too_wide = [line for line in out.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    for name in OPS:
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "mlp: site = linear + silu_and_mul" in out
    assert "  - triton               cuda; bf16/fp16/fp32" in out  # one line per (op, backend), dtypes short


def test_listing_follows_a_narrower_terminal(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "60")
    main([])
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 60
