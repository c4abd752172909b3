"""`python -m nanovllm.bench compare` against the per-GPU baselines, on synthetic results files: the default
baseline is the run's GPU's, an explicit one wins, a regression beyond the threshold exits 1, a missing
baseline exits 2 with a message naming where it looked; `bench baseline` folds a run's rows in by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanovllm.bench import baseline
from nanovllm.bench.__main__ import main as bench_main
from nanovllm.bench.results import DEFAULT_OUT_DIR, command_line, save
from tests.helpers import ROOT

GPU = "NVIDIA Test GPU 80GB"


def run_file(tmp_path: Path, name: str, rates: dict[tuple[str, int], float], gpu: str = GPU, **extra) -> Path:
    r = dict(gpu=gpu, git_sha="abc1234", date="2026-12-01T00:00:00+00:00", versions={"torch": "x"},
             command="python -m nanovllm.bench latency", peers={}, ops=[], throughput={}, launches_per_token={},
             latency=[dict(preset=p, context=c, decode_tok_s=v, median_ms=1e3 / v) for (p, c), v in rates.items()])
    r.update(extra)
    return save(r, tmp_path / name)


@pytest.fixture
def in_checkout(tmp_path, monkeypatch):
    """A working directory with a benchmarks/baseline/ of its own, holding GPU's baseline."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "benchmarks" / "baseline" / baseline.file_name(GPU)
    path.parent.mkdir(parents=True)
    run = json.loads(run_file(tmp_path, "base_run.json", {("all_fused", 128): 1600.0, ("auto", 128): 1580.0},
                              launches_per_token={"all_fused": 172.0}).read_text())
    save(baseline.merge(None, run), path)
    return tmp_path, path


def test_default_baseline_is_the_runs_gpus(in_checkout, capsys):
    tmp, path = in_checkout
    same = run_file(tmp, "same.json", {("all_fused", 128): 1590.0, ("auto", 128): 1570.0})
    assert bench_main(["compare", str(same)]) == 0
    assert str(path) in capsys.readouterr().out


def test_a_regression_beyond_the_threshold_fails(in_checkout, capsys):
    tmp, _ = in_checkout
    slow = run_file(tmp, "slow.json", {("all_fused", 128): 1600.0, ("auto", 128): 1300.0})
    assert bench_main(["compare", str(slow)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert bench_main(["compare", str(slow), "--threshold", "0.25"]) == 0


def test_rows_only_in_the_baseline_are_not_gated(in_checkout):
    tmp, _ = in_checkout
    partial = run_file(tmp, "partial.json", {("auto", 128): 1580.0})
    assert bench_main(["compare", str(partial)]) == 0


def test_explicit_baseline_wins(in_checkout, tmp_path):
    tmp, _ = in_checkout
    faster = run_file(tmp, "faster.json", {("auto", 128): 3000.0})
    run = run_file(tmp, "run.json", {("auto", 128): 1580.0})
    assert bench_main(["compare", str(run)]) == 0
    assert bench_main(["compare", str(run), "--baseline", str(faster)]) == 1


def test_two_runs_compare_b_over_a(tmp_path):
    a = run_file(tmp_path, "a.json", {("all_fused", 128): 1600.0})
    b = run_file(tmp_path, "b.json", {("all_fused", 128): 1200.0})
    assert bench_main(["compare", str(b), str(a)]) == 0   # a over b: faster
    assert bench_main(["compare", str(a), str(b)]) == 1
    assert bench_main(["compare", str(a), str(b), "--baseline", str(a)]) == 2


def test_missing_baseline_names_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = run_file(tmp_path, "run.json", {("auto", 128): 1.0}, gpu="Some Unknown GPU")
    assert bench_main(["compare", str(run)]) == 2
    out = capsys.readouterr().out
    assert "no baseline for GPU 'Some Unknown GPU'" in out and "some-unknown-gpu.json" in out


def test_merge_replaces_rows_by_key_and_keeps_the_rest(in_checkout):
    _, path = in_checkout
    before = json.loads(path.read_text())
    run = dict(gpu=GPU, git_sha="def5678", date="2026-12-02", versions={}, command="c",
               latency=[dict(preset="auto", context=128, decode_tok_s=1650.0, build_s=12.0),
                        dict(preset="all_fused", context=128, decode_tok_s=1.0)],
               launches_per_token={"auto": 172.0, "all_fused": 999.0}, throughput={}, peers={}, ops=[])
    after = baseline.merge(before, run, presets=("auto",))
    rows = {(r["preset"], r["context"]): r for r in after["latency"]}
    assert rows["auto", 128]["decode_tok_s"] == 1650.0 and rows["auto", 128]["git_sha"] == "def5678"
    assert rows["auto", 128]["build_s"] == 12.0
    assert rows["all_fused", 128]["decode_tok_s"] == 1600.0 and rows["all_fused", 128]["git_sha"] == "abc1234"
    assert after["launches_per_token"] == {"all_fused": 172.0, "auto": 172.0}
    assert before["latency"] != after["latency"]  # merge returns a new baseline, the old one is unchanged
    with pytest.raises(ValueError, match="one GPU per baseline"):
        baseline.merge(before, dict(run, gpu="another GPU"))


def test_baseline_command_writes_the_gpus_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = run_file(tmp_path, "run.json", {("auto", 128): 1500.0, ("all_fused", 128): 1600.0})
    assert bench_main(["baseline", str(run), "--presets", "auto"]) == 0
    written = json.loads((tmp_path / "benchmarks" / "baseline" / baseline.file_name(GPU)).read_text())
    assert [(r["preset"], r["context"]) for r in written["latency"]] == [("auto", 128)]
    assert bench_main(["compare", str(run)]) == 0


def test_shipped_h100_baseline_gates_itself(monkeypatch):
    monkeypatch.chdir(ROOT)
    path = baseline.find("NVIDIA H100 80GB HBM3")
    b = json.loads(path.read_text())
    rows = {(r["preset"], r["context"]): r for r in b["latency"]}
    assert rows["all_fused", 128]["decode_tok_s"] > 1500 and rows["all_fused", 128]["git_sha"]
    assert b["throughput"]["output_tok_s"] > 0 and b["peers"]["hf_static_compile"] > 0
    assert bench_main(["compare", str(path)]) == 0


def test_output_goes_to_a_relative_folder_outside_the_package():
    assert not DEFAULT_OUT_DIR.is_absolute() and DEFAULT_OUT_DIR == Path("bench-results")
    assert command_line(["/x/nanovllm/bench/__main__.py", "latency"]) == "python -m nanovllm.bench latency"


def test_merge_replaces_offload_rows_by_model_and_budget():
    row = dict(model="qwen3-8b-random", cpu_offload_gb=8.0, gpu_memory_utilization=0.9, decode_tok_s=6.0,
               fraction_of_bound=0.99, gpu=GPU)
    first = baseline.merge(None, dict(gpu=GPU, git_sha="a", offload=[row, dict(row, cpu_offload_gb=0.0)]))
    second = baseline.merge(first, dict(gpu=GPU, git_sha="b", offload=[dict(row, decode_tok_s=7.0)]))
    rows = {r["cpu_offload_gb"]: r for r in second["offload"]}
    assert rows[8.0]["decode_tok_s"] == 7.0 and rows[8.0]["git_sha"] == "b"
    assert rows[0.0]["git_sha"] == "a" and len(second["offload"]) == 2


def test_merge_keeps_quantized_decode_rows_per_model_and_format():
    row = dict(model="qwen3-8b-random", preset="int4", quantization="int4", context=128, decode_tok_s=350.0)
    dense = dict(row, preset="auto", quantization=None, decode_tok_s=194.0)
    first = baseline.merge(None, dict(gpu=GPU, git_sha="a", latency=[row, dense, dict(row, preset="fp8",
                                                                                       quantization="fp8")]))
    assert {r["quantization"] for r in first["quantized"]} == {"int4", "fp8"}
    assert all(r["gpu"] == GPU and r["git_sha"] == "a" for r in first["quantized"])
    second = baseline.merge(first, dict(gpu=GPU, git_sha="b", latency=[dict(row, decode_tok_s=360.0)]))
    rows = {r["quantization"]: r for r in second["quantized"]}
    assert rows["int4"]["decode_tok_s"] == 360.0 and rows["fp8"]["git_sha"] == "a" and len(rows) == 2
