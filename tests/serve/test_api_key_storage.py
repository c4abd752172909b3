"""The API key is never written to disk: a key given as a command-line override is refused before Hydra
records anything; a key from $NANOVLLM_API_KEY or server.api_key_file works and appears in no file of the
run directory (Hydra records the env interpolation unresolved)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from nanovllm.serve.api_keys import APIKeyOverrideError, refuse_api_key_override, resolve_api_key

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-never-on-disk-4f1c9a"


@pytest.mark.parametrize("arg", [f"server.api_key={KEY}", f"+server.api_key={KEY}", f"++server.api_key={KEY}"])
def test_key_override_is_refused(arg):
    with pytest.raises(APIKeyOverrideError, match="NANOVLLM_API_KEY"):
        refuse_api_key_override(["model=tiny", arg])


@pytest.mark.parametrize("arg", ["server.api_key=null", "server.api_key=${oc.env:MY_KEY}", "server.port=1",
                                 "server.api_key_file=/run/secrets/key"])
def test_other_overrides_pass(arg):
    refuse_api_key_override([arg])


def test_key_file(tmp_path):
    path = tmp_path / "key"
    path.write_text(f"  {KEY}\n")
    assert resolve_api_key(None, str(path)) == KEY
    assert resolve_api_key("from-env", None) == "from-env"
    with pytest.raises(ValueError, match="set one"):
        resolve_api_key("from-env", str(path))
    with pytest.raises(ValueError, match="cannot be read"):
        resolve_api_key(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_key(None, str(tmp_path / "empty"))


def test_entry_point_refuses_key_override_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "nanovllm.serve", "model=tiny", "device=cpu", f"server.api_key={KEY}",
                        f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "NANOVLLM_API_KEY" in p.stderr and "api_key_file" in p.stderr, p.stderr[-2000:]
    assert not run_dir.exists()


def assert_key_nowhere(run_dir) -> None:
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert any(f.name == "config.yaml" for f in files), files  # Hydra did record the run
    for f in files:
        assert KEY not in f.read_text(errors="replace"), f


@pytest.mark.parametrize("source", ["env", "file"])
def test_key_from_env_or_file_is_not_written(spawn_server, tmp_path, source):
    if source == "env":
        server = spawn_server("server.warmup=false", env={"NANOVLLM_API_KEY": KEY})
    else:
        key_file = tmp_path / "key"
        key_file.write_text(KEY + "\n")
        server = spawn_server("server.warmup=false", f"server.api_key_file={key_file}")
    server.wait_healthy()
    body = {"prompt": "hi", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 401
    assert httpx.post(server.url + "/tokenize", json=body, timeout=60).status_code == 401
    ok = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200, ok.text
    server.proc.send_signal(signal.SIGTERM)
    code, out = server.wait_exit()
    assert code == 0 and KEY not in out, out[-3000:]
    assert_key_nowhere(server.run_dir)
