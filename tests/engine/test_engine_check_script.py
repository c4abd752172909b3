"""scripts/gpu_engine_check.py (the GPU's cross-path correctness check) runs end to end on the CPU with the
tiny model, so a broken script is found here rather than in a device call. It runs from the checkout: it reads
configs/kernels/ by relative path and writes only its --out file."""

from __future__ import annotations

import importlib.util
import json
import sys

from tests.helpers import ROOT

# On a CPU the Triton and FlashInfer configurations fall back to the native ops and repeat `graphs`; the compile
# one repeats tests/ops/test_ops.py for half a minute of compiling. These three take different paths here.
DISTINCT_ON_CPU = ("eager_nographs", "graphs", "graphs_sdpa")


def test_engine_check_runs_on_cpu(tiny_model, tmp_path, monkeypatch):
    """In this process: its engines share the plugins and the tokenizer already loaded here."""
    spec = importlib.util.spec_from_file_location("gpu_engine_check", ROOT / "scripts" / "gpu_engine_check.py")
    monkeypatch.chdir(ROOT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(check, "CHECKED", {dtype: tuple(name for name in names if name in DISTINCT_ON_CPU)
                                           for dtype, names in check.CHECKED.items()})
    out = tmp_path / "engine.json"
    monkeypatch.setenv("NANOVLLM_PROGRESS", "0")
    monkeypatch.setattr(sys, "argv", ["gpu_engine_check.py", "--out", str(out), "--check", "--configs", "",
                                      "--model", str(tiny_model), "--device", "cpu", "--positions", "6"])
    check.main()
    rows = json.loads(out.read_text())["correctness"]
    assert not [r for r in rows if "error" in r]
    by_name = {(r["dtype"], r["config"]): r for r in rows}
    fp32 = by_name["float32", "eager_nographs"]
    assert fp32["rel_err_vs_hf"] < 1e-4 and fp32["argmax_agree_vs_hf"] == 1.0 and fp32["greedy_equal_eager"]
    assert by_name["bfloat16", "transformers_bf16"]["rel_err_vs_hf"] < 0.05
