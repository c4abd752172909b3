"""End to end on CPU: `python -m nanovllm.run` writes results.json; a `-m` sweep aggregates."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env

pytestmark = pytest.mark.skipif(not (ROOT / "nanovllm" / "llm.py").exists(),
                                reason="nanovllm/llm.py (the engine API) does not exist yet")
# the smallest run that still exercises every part: the tiny model, a few tokens
SMALL = ["model=tiny", "device=cpu", "engine=cpu_small", "bench.num_prompts=2", "bench.max_tokens=4",
         "bench.decode_tokens=6", "bench.prefill_len=32", "bench.warmup=1", "bench.repeats=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A model cache shared by this module's runs (the tiny model is written once)."""
    cache = tmp_path_factory.mktemp("nanovllm_cache")
    return subprocess_env(NANOVLLM_CACHE=str(cache))


def run(args, env, timeout=600) -> subprocess.CompletedProcess:
    """Run from the model cache's folder, so nothing the child writes lands in the checkout."""
    p = subprocess.run([sys.executable, *args], cwd=env["NANOVLLM_CACHE"], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def test_run_writes_results(tmp_path, env):
    p = run(["-m", "nanovllm.run", "model=tiny", "device=cpu", f"hydra.run.dir={tmp_path}"], env)
    r = json.loads((tmp_path / "results.json").read_text())
    for key in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "pct_roofline", "roofline_tok_s"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["device_type"] == "cpu" and r["device"] and r["dtype"] == "float32"
    assert r["model"]["name"] == "tiny" and r["model"]["random_weights"] is True
    assert r["model"]["weight_bytes"] > 0 and r["model"]["kv_bytes_per_token"] > 0
    assert r["kernel_table"]["0"]["mlp"] == "eager" and "model" in r["kernel_table"]
    assert r["config"]["model"]["name"] == "tiny" and r["config"]["kernels"]["default"] == "auto"
    assert r["kernel_summary"].startswith("kernels (cpu, float32, default auto): eager for")
    assert r["bench"] == r["config"]["bench"]["cpu"]  # device=cpu picked the CPU sizes
    assert r["overrides"] == ["model=tiny", "device=cpu"]
    assert r["git_sha"] and r["date"] and {"torch", "triton", "transformers", "flashinfer", "python"} <= set(
        r["versions"])
    assert len(r["demo"]) == r["bench"]["num_prompts"]
    assert "random weights" in p.stdout and "model.name=/path/to/hf/folder" in p.stdout
    assert "decode" in p.stdout and "roofline" in p.stdout
    assert "target" not in p.stdout and r["targets_tok_s"] == []  # the GPU targets do not apply on a CPU


def test_bad_backend_fails_before_building(tmp_path, env):
    p = subprocess.run([sys.executable, "-m", "nanovllm.run", "model=tiny", "device=cpu",
                        "kernels.ops.rms_norm=tritonn", f"hydra.run.dir={tmp_path}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "valid backends" in p.stderr and "eager" in p.stderr
    assert "building model" not in p.stdout


def test_sweep_then_aggregate(tmp_path, env):
    sweep = tmp_path / "sweep"
    run(["-m", "nanovllm.run", "-m", "+kernels=baseline,compile_norms", *SMALL, f"hydra.sweep.dir={sweep}"],
        env)
    results = sorted(sweep.rglob("results.json"))
    assert len(results) == 2
    tables = [json.loads(p.read_text())["kernel_table"] for p in results]
    assert {t["0"]["rms_norm"] for t in tables} == {"eager", "compile"}

    out = tmp_path / "summary"
    run([str(ROOT / "experiments" / "aggregate.py"), str(sweep), "--out", str(out)], env)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["overrides"] for r in rows] == ["+kernels=baseline", "+kernels=compile_norms"]
    assert all(float(r["decode_tok_s"]) > 0 and float(r["pct_roofline"]) > 0 for r in rows)
    md = (out / "summary.md").read_text()
    assert "+kernels=compile_norms" in md and "decode tok/s" in md
    assert "ran once" in md and "fastest:" not in md  # single runs: the noise is unknown, no fastest named
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
