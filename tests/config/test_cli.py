"""The `nanovllm` command: ecosystem flags become Hydra overrides; overrides and Hydra flags pass through."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nanovllm.cli import CliError, hydra_value, main, to_hydra
from tests.helpers import ROOT

MODELS = ("default", "gemma3-270m", "smollm2-135m", "tiny")
KERNELS = ("all_fused", "baseline", "fused_mlp", "sdpa")


def hydra(command, *args):
    return to_hydra(command, list(args), MODELS, KERNELS)


def test_serve_flags_map_onto_hydra_overrides(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    out = hydra("serve", "Qwen/Qwen3-0.6B", "--port", "8000", "--host", "0.0.0.0", "--api-key-file", str(key),
                "--max-model-len", "4096", "--gpu-memory-utilization=0.8", "--kernels", "all_fused")
    assert out.argv == ["model.name=Qwen/Qwen3-0.6B", "server.port=8000", "server.host=0.0.0.0",
                        "engine.max_model_len=4096", "engine.gpu_memory_utilization=0.8", "+kernels=all_fused"]
    assert out.env == {"NANOVLLM_API_KEY": "s3cret"}  # never in argv, nor in Hydra's saved overrides


def test_overrides_and_hydra_flags_pass_through_unchanged():
    out = hydra("run", "model=tiny", "device=cpu", "--cfg", "job", "kernels.ops.rms_norm=triton", "-m",
                "'+kernels=[fused_mlp,sdpa]'", "--enforce-eager", "--revision", "v1.0", "~bench.gpu")
    assert out.argv == ["--cfg", "job", "-m", "model=tiny", "device=cpu", "kernels.ops.rms_norm=triton",
                        "'+kernels=[fused_mlp,sdpa]'", "engine.enforce_eager=true", "model.revision=v1.0",
                        "~bench.gpu"]


def test_model_presets_switches_and_lists():
    assert hydra("run", "tiny").argv == ["model=tiny"]  # a configs/model preset keeps its settings
    assert hydra("run", "--model", "/models/my model").argv == ["model.name='/models/my model'"]
    out = hydra("run", "--kernels", "fused_mlp,sdpa", "--plugin-dir", "/a", "--plugin-dir", "/b",
                "--no-enable-prefix-caching", "--seed", "3")
    assert out.argv == ["engine.enable_prefix_caching=false", "engine.seed=3", "+kernels=[fused_mlp,sdpa]",
                        "kernels.plugin_dirs=[/a,/b]"]


@pytest.mark.parametrize("args, message", [
    (["--bogus", "1"], r"unknown flag '--bogus' for `nanovllm run`; known flags: .*--max-model-len"),
    (["--port", "8000"], r"unknown flag '--port' for `nanovllm run`"),  # a server flag
    (["--kernels", "all_fusd"], r"unknown preset\(s\) \['all_fusd'\]; presets: all_fused"),
    (["a/b", "c/d"], r"two models given"),
    (["--max-model-len"], r"--max-model-len needs a value"),
    (["--enforce-eager=1"], r"--enforce-eager takes no value"),
])
def test_bad_command_lines_are_explained(args, message):
    with pytest.raises(CliError, match=message):
        hydra("run", *args)


def test_api_key_file_must_exist(tmp_path):
    with pytest.raises(CliError, match="--api-key-file .*No such file"):
        hydra("serve", "--api-key-file", str(tmp_path / "absent"))


def test_values_are_quoted_only_when_hydra_needs_it():
    assert hydra_value("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert hydra_value("0.0.0.0") == "0.0.0.0"
    assert hydra_value("a b,c") == "'a b,c'"
    assert hydra_value("it's") == "'it\\'s'"
    assert hydra_value("null") == "'null'"
    assert hydra_value("~/models/x") == "'~/models/x'"


def test_unknown_flag_exits_2_with_the_message(capsys):
    assert main(["serve", "--bogus"]) == 2
    assert "unknown flag '--bogus' for `nanovllm serve`" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    assert main(["--help"]) == 0 and "nanovllm run" in capsys.readouterr().out


@pytest.mark.slow  # writes the tiny model into a fresh cache, then builds and benchmarks it
def test_nanovllm_run_end_to_end(tmp_path):
    env = dict(os.environ, NANOVLLM_CACHE=str(tmp_path / "cache"), NANOVLLM_PROGRESS="0", HYDRA_FULL_ERROR="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    args = ["tiny", "--device", "cpu", "--max-model-len", "256", "--enforce-eager", "bench.num_prompts=1",
            "bench.max_tokens=2", "bench.decode_tokens=4", "bench.prefill_len=16", "bench.warmup=0",
            "bench.repeats=1", f"hydra.run.dir={tmp_path / 'run'}"]
    p = subprocess.run([sys.executable, "-m", "nanovllm.cli", "run", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["overrides"] == ["model=tiny", "device=cpu", "engine.max_model_len=256", "engine.enforce_eager=true",
                              "bench.num_prompts=1", "bench.max_tokens=2", "bench.decode_tokens=4",
                              "bench.prefill_len=16", "bench.warmup=0", "bench.repeats=1"]
    assert r["decode_tok_s"] > 0
