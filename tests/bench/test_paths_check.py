"""`python -m nanovllm.bench paths` (every execution path's logits against transformers) runs end to end on the
CPU with the tiny model, so a broken check is found here rather than on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_paths_check_runs_on_cpu(tiny_model, tmp_path):
    env = dict(os.environ, NANOVLLM_PROGRESS="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", "nanovllm.bench", "paths", "--out-dir", str(tmp_path), "--positions", "6",
                    "--paths", "eager", f"model.name='{tiny_model}'", "device=cpu"],
                   cwd=tmp_path, check=True, timeout=600, env=env)
    (out,) = tmp_path.glob("paths_*.json")
    rows = json.loads(out.read_text())["paths"]
    assert not [r for r in rows if "error" in r]
    by_name = {(r["dtype"], r["path"]): r for r in rows}
    fp32 = by_name["float32", "eager"]
    assert fp32["rel_err_vs_hf"] < 1e-4 and fp32["argmax_agree_vs_hf"] == 1.0 and fp32["greedy_equal_eager"]
    assert by_name["bfloat16", "transformers_bf16"]["rel_err_vs_hf"] < 0.05
    assert set(by_name) == {("float32", "eager"), ("bfloat16", "eager"), ("bfloat16", "transformers_bf16")}


def test_every_path_composes():
    """Each path's preset and overrides compose into a checked run config (building them all would take
    minutes on a CPU, where the fused paths fall back to the native ops; the run above builds one)."""
    from nanovllm.bench import paths, presets

    for name, (preset, engine) in paths.PATHS.items():
        cfg = presets.compose_config(preset, presets.merge_overrides((*paths.ENGINE, *engine), ("model=tiny",)))
        assert cfg.engine.max_model_len == 1024, name


def test_unknown_path_is_named(tmp_path):
    from nanovllm.bench.__main__ import main as bench_main

    assert bench_main(["paths", "--paths", "eagre", "--out-dir", str(tmp_path)]) == 2
