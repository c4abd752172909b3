"""experiments/aggregate.py: repeats of one configuration are grouped with their spread, and a fastest is
named only when the difference is outside the run-to-run noise."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
_spec = importlib.util.spec_from_file_location("experiments_aggregate", ROOT / "experiments" / "aggregate.py")
aggregate = sys.modules["experiments_aggregate"] = importlib.util.module_from_spec(_spec)  # dataclasses need it
_spec.loader.exec_module(aggregate)


def write_sweep(root: Path, runs: list[tuple[list[str], float]], device_type: str = "cpu") -> Path:
    for i, (overrides, decode) in enumerate(runs):
        job = root / str(i)
        job.mkdir(parents=True)
        targets = [230.0, 400.0] if device_type == "cuda" else []
        (job / "results.json").write_text(json.dumps(dict(
            overrides=["model=tiny", *overrides], decode_tok_s=decode, prefill_tok_s=100.0, ttft_ms=5.0,
            pct_roofline=10.0, roofline_tok_s=1000.0, device="dev", device_type=device_type,
            targets_tok_s=targets, model={"name": "tiny"})))
    return root


def summarize(tmp_path: Path, *dirs: Path) -> str:
    out = tmp_path / "summary"
    assert aggregate.main([*map(str, dirs), "--out", str(out)]) == 0
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return (out / "summary.md").read_text()


def test_repeats_group_into_one_row_with_their_spread(tmp_path):
    sweep = write_sweep(tmp_path / "s", [(["+kernels=a", "engine.seed=0"], 100.0),
                                         (["+kernels=a", "engine.seed=1"], 104.0),
                                         (["+kernels=a", "engine.seed=2"], 102.0),
                                         (["+kernels=b", "engine.seed=0"], 50.0),
                                         (["+kernels=b", "engine.seed=1"], 52.0),
                                         (["+kernels=b", "engine.seed=2"], 51.0)])
    md = summarize(tmp_path, sweep)
    assert "| +kernels=a | 3 | 102.0 | 100.0 - 104.0 |" in md
    assert "| +kernels=b | 3 | 51.0 | 50.0 - 52.0 |" in md
    assert "fastest: +kernels=a at a median 102.0 tok/s" in md
    rows = list(csv.DictReader((tmp_path / "summary" / "summary.csv").open()))
    assert len(rows) == 6 and rows[1]["overrides"] == "+kernels=a" and rows[1]["repeat"] == "engine.seed=1"


def test_overlapping_ranges_name_no_fastest(tmp_path):
    sweep = write_sweep(tmp_path / "s", [(["+kernels=a", "engine.seed=0"], 100.0),
                                         (["+kernels=a", "engine.seed=1"], 112.0),
                                         (["+kernels=b", "engine.seed=0"], 105.0),
                                         (["+kernels=b", "engine.seed=1"], 106.0)])
    md = summarize(tmp_path, sweep)
    assert "fastest:" not in md
    assert "no fastest named: +kernels=a (100.0 - 112.0 tok/s) overlaps +kernels=b (105.0 - 106.0)" in md


def test_single_runs_name_no_fastest(tmp_path):
    sweep = write_sweep(tmp_path / "s", [(["+kernels=a"], 100.0), (["+kernels=b"], 90.0)])
    md = summarize(tmp_path, sweep)
    assert "fastest:" not in md and "ran once" in md and "| one run |" in md


def test_several_sweep_dirs_are_repeats(tmp_path):
    dirs = [write_sweep(tmp_path / f"s{i}", [(["+kernels=a"], 100.0 + i), (["+kernels=b"], 50.0 + i)])
            for i in range(3)]
    md = summarize(tmp_path, *dirs)
    assert "| +kernels=a | 3 | 101.0 | 100.0 - 102.0 |" in md
    assert "fastest: +kernels=a" in md


def test_gpu_targets_only_from_gpu_runs(tmp_path):
    cpu = aggregate.load_runs([write_sweep(tmp_path / "cpu", [([], 1.0)])])
    gpu = aggregate.load_runs([write_sweep(tmp_path / "gpu", [([], 1.0)], device_type="cuda")])
    assert aggregate.gpu_targets(cpu) == [] and aggregate.gpu_targets(gpu) == [230.0, 400.0]
