"""`python -m nanovllm.serve`: configs/serve.yaml composes with the run config's groups and overrides;
the load benchmark's --spawn mode runs the real entry point end to end; the examples run unchanged."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from nanovllm.config import check_schema
from nanovllm.serve.background import serve_model
from nanovllm.serve.schema import check_serve_schema, register_serve_configs
from tests.helpers import ROOT, subprocess_env

register_serve_configs()


def compose_serve(overrides=(), name="serve"):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_serve_config_defaults():
    cfg = compose_serve()
    check_serve_schema(cfg)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000 and cfg.server.max_queued_requests == 256
    assert cfg.model.name == "default" and cfg.kernels.default == "auto" and "max_num_seqs" in cfg.engine


def test_serve_config_takes_run_overrides():
    cfg = compose_serve(["model=tiny", "engine=cpu_small", "+kernels=[compile_linear,compile_norms]",
                         "kernels.ops.rope=compile", "server.port=9001", "server.api_key=abc",
                         "server.served_model_name=qwen"])
    check_serve_schema(cfg)
    assert cfg.model.name == "tiny" and cfg.engine.max_num_seqs == 16
    assert OmegaConf.to_container(cfg.kernels.ops) == {"linear": "compile", "rms_norm": "compile",
                                                       "add_rms_norm": "compile", "rope": "compile"}
    assert (cfg.server.port, cfg.server.api_key, cfg.server.served_model_name) == (9001, "abc", "qwen")


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("NANOVLLM_API_KEY", "from-env")
    assert compose_serve().server.api_key == "from-env"
    monkeypatch.delenv("NANOVLLM_API_KEY")
    assert compose_serve().server.api_key is None


@pytest.mark.parametrize("override", ["server.typo=1", "server.port=abc", "+server.typo=1", "engine.typo=1"])
def test_serve_config_typos_fail(override):
    with pytest.raises(Exception) as e:
        check_serve_schema(compose_serve([override]))
    assert isinstance(e.value, (ConfigCompositionException, ValueError)) or "typo" in str(e.value)


@pytest.mark.parametrize("override,message", [("server.port=70000", "port"),
                                              ("server.max_queued_requests=0", "max_queued_requests"),
                                              ("server.api_key=' '", "api_key")])
def test_serve_config_bad_values(override, message):
    with pytest.raises(ValueError, match=message):
        check_serve_schema(compose_serve([override]))


def test_run_config_is_untouched_by_serve_schema():
    """Registering the serve schema must not leak a `server` key into `python -m nanovllm.run`."""
    cfg = compose_serve(name="config")
    assert "server" not in cfg
    check_schema(cfg)


def test_spawned_server_load_benchmark(tiny_model, tmp_path):
    """benchmarks/serve_load.py --spawn: starts `python -m nanovllm.serve`, waits for /health, streams
    from concurrent clients (a quarter of them with a JSON schema and penalties), writes the JSON, and stops
    the server."""
    pytest.importorskip("xgrammar")
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--spawn", "-c", "4", "-n", "8",
           "--constrained-fraction", "0.25",
           "--max-tokens", "8", "--prompt-words", "16", "--startup-timeout", "120", "--time-limit", "60",
           "--out", str(out), "--", f"model.name={tiny_model}", "device=cpu", "engine=cpu_small",
           "server.served_model_name=tiny-served"]
    p = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["model"] == "tiny-served" and res["ok"] == 8 and res["failed"] == 0
    assert res["constrained"] == 2 and res["output_tok_s"] > 0
    assert 48 < res["output_tokens"] <= 64  # a constrained request may finish its JSON before max_tokens
    for key in ("ttft_ms", "itl_ms"):
        assert 0 < res[key]["p50"] <= res[key]["p99"]
    assert "throughput" in p.stdout and "TTFT" in p.stdout


def test_load_benchmark_refuses_constrained_requests_without_xgrammar(monkeypatch, capsys):
    """--spawn with constrained requests checks for xgrammar before starting a server whose JSON-schema outputs
    would all fail."""
    import importlib.util

    parse_args = runpy.run_path(str(ROOT / "benchmarks" / "serve_load.py"))["parse_args"]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "xgrammar" else find_spec(name, *a))
    with pytest.raises(SystemExit):
        parse_args(["--spawn", "--constrained-fraction", "0.1"])
    assert "xgrammar" in capsys.readouterr().err
    assert parse_args(["--spawn"]).constrained_fraction == 0


@pytest.fixture(scope="module")
def example_server(tiny_model):
    """Served as `python -m nanovllm.serve model=tiny` serves it: under the name "tiny", no API key."""
    with serve_model(tiny_model, "tiny", device="cpu", max_model_len=256, num_kvcache_blocks=64) as server:
        yield server


@pytest.mark.parametrize("script", ["openai_client.py", "langchain_chat.py"])
def test_examples_run(example_server, script, monkeypatch, capsys):
    """In this process (runpy), so the test does not pay for importing openai / LangChain again. The server
    listens on a free port, given through OPENAI_BASE_URL; model id and API key are the scripts' defaults."""
    pytest.importorskip("langchain_openai" if "langchain" in script else "openai")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{example_server.url}/v1")
    monkeypatch.delenv("NANOVLLM_API_KEY", raising=False)
    monkeypatch.setattr(sys, "argv", [script, "--max-tokens", "4"])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "usage" in out and "model: tiny" in out
