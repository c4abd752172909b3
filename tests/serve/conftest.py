"""Helpers for tests that start `python -m nanovllm.serve` as a real process on a free 127.0.0.1 port, and
clients of a test module's `server` fixture (each module starts the server its tests need)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedServer:
    def __init__(self, proc: subprocess.Popen, port: int, run_dir: Path):
        self.proc, self.port, self.run_dir = proc, port, run_dir
        self.url = f"http://127.0.0.1:{port}"

    def wait_healthy(self, timeout: float = 180) -> SpawnedServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read()[-3000:]
                raise AssertionError(f"the server exited with {self.proc.returncode}: {out}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.url} was not healthy within {timeout} s")

    def wait_exit(self, timeout: float = 60) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def stop(self) -> None:
        """Kill the server if it is still up, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def start_server(run_dir: Path, *overrides: str, env: dict | None = None, pythonpath=()) -> SpawnedServer:
    """`python -m nanovllm.serve model=tiny device=cpu engine=cpu_small *overrides` on a free port, with its Hydra
    run dir `run_dir` and `pythonpath`, then this checkout, first on its PYTHONPATH; not yet waited for."""
    port = free_port()
    path = os.pathsep.join([*map(str, pythonpath), str(ROOT), os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, "PYTHONPATH": path, "NANOVLLM_PROGRESS": "0", **(env or {})}
    cmd = [sys.executable, "-m", "nanovllm.serve", "model=tiny", "device=cpu", "engine=cpu_small",
           f"server.port={port}", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return SpawnedServer(proc, port, run_dir)


@pytest.fixture
def spawn_server(tmp_path):
    """spawn_server(*overrides, env=None, pythonpath=()) -> SpawnedServer (start_server's) with its Hydra run dir
    under tmp_path; killed at the end if still up."""
    servers = []

    def spawn(*overrides: str, env: dict | None = None, pythonpath=()) -> SpawnedServer:
        servers.append(start_server(tmp_path / f"run{len(servers)}", *overrides, env=env, pythonpath=pythonpath))
        return servers[-1]

    yield spawn
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def http(server):
    """An HTTP client of the test module's `server` fixture."""
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def openai_client(server):
    """The openai client against the test module's `server` fixture."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
