"""scripts/gpu_engine_check.py (the GPU's cross-path correctness check) runs end to end on the CPU with the
tiny model, so a broken script is found here rather than in a device call. It runs from the checkout: it reads
configs/kernels/ by relative path and writes only its --out file."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT, subprocess_env


def test_engine_check_runs_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "engine.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_engine_check.py"), "--out", str(out), "--check",
                    "--configs", "", "--model", str(tiny_model), "--device", "cpu", "--positions", "6"],
                   cwd=ROOT, check=True, timeout=600, env=subprocess_env())
    rows = json.loads(out.read_text())["correctness"]
    assert not [r for r in rows if "error" in r]
    by_name = {(r["dtype"], r["config"]): r for r in rows}
    fp32 = by_name["float32", "eager_nographs"]
    assert fp32["rel_err_vs_hf"] < 1e-4 and fp32["argmax_agree_vs_hf"] == 1.0 and fp32["greedy_equal_eager"]
    assert by_name["bfloat16", "transformers_bf16"]["rel_err_vs_hf"] < 0.05
