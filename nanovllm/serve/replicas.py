"""The engine processes behind a data-parallel server: replica i is `python -m nanovllm.serve` on 127.0.0.1 and
a free port, pinned to one GPU through CUDA_VISIBLE_DEVICES where there are GPUs.

A replica that exits is started again (after a back-off that grows with quick successive deaths); its in-flight
requests fail at the front as their connections break. A replica that exits before it was ever healthy means
a bad configuration: the whole server stops (`failed`), rather than restarting it for ever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import httpx

log = logging.getLogger("nanovllm.serve")

HEALTH_POLL_S = 0.2
MAX_BACKOFF_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    index: int
    command: list[str]  # without the port, which each start picks anew
    env: dict[str, str]
    port: int = 0
    proc: asyncio.subprocess.Process | None = None
    healthy: bool = False
    ever_healthy: bool = False
    restarts: int = 0
    started_at: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def describe(self) -> dict:
        return dict(replica=self.index, healthy=self.healthy, port=self.port, restarts=self.restarts,
                    pid=self.proc.pid if self.proc else None, gpu=self.env.get("CUDA_VISIBLE_DEVICES"))


class ReplicaSet:
    """Starts, watches and restarts the replicas; `stop()` sends each SIGTERM (its own graceful drain)."""

    def __init__(self, commands: list[list[str]], envs: list[dict[str, str]], stop_timeout_s: float):
        self.replicas = [Replica(i, cmd, env) for i, (cmd, env) in enumerate(zip(commands, envs))]
        self.stop_timeout_s = stop_timeout_s
        self.stopping = False
        self.failed: str | None = None  # why the server cannot go on (a replica that never became healthy)
        self._tasks: list[asyncio.Task] = []

    def healthy(self) -> list[int]:
        return [r.index for r in self.replicas if r.healthy]

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._supervise(r), name=f"replica-{r.index}") for r in self.replicas]

    async def wait_all_ready(self, give_up=lambda: False) -> bool:
        """True once every replica has been healthy; False if the set failed or `give_up()` came true first."""
        waits = [asyncio.create_task(r.ready.wait()) for r in self.replicas]
        try:
            while not all(w.done() for w in waits):
                if self.failed or self.stopping or give_up():
                    return False
                await asyncio.wait(waits, timeout=0.5)
            return True
        finally:
            for w in waits:
                w.cancel()

    async def _supervise(self, r: Replica) -> None:
        backoff = 1.0
        while not self.stopping:
            r.port = free_port()
            r.started_at = time.monotonic()
            # its own session: a terminal's Ctrl-C reaches the front only, which drains the replicas itself
            r.proc = await asyncio.create_subprocess_exec(*r.command, f"server.port={r.port}", env=r.env,
                                                          start_new_session=True, preexec_fn=_die_with_parent)
            log.info("replica %d: pid %d on port %d%s", r.index, r.proc.pid, r.port,
                     f", GPU {r.env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in r.env else "")
            watch = asyncio.create_task(self._watch_health(r))
            code = await r.proc.wait()
            watch.cancel()
            r.healthy = False
            if self.stopping:
                break
            if not r.ever_healthy:
                self.failed = f"replica {r.index} exited with status {code} before it was ever healthy"
                log.error("%s; stopping", self.failed)
                break
            lived = time.monotonic() - r.started_at
            backoff = 1.0 if lived > 60 else min(backoff * 2, MAX_BACKOFF_S)
            log.error("replica %d exited with status %s; restarting it in %.0f s", r.index, code, backoff)
            r.restarts += 1
            await asyncio.sleep(backoff)

    async def _watch_health(self, r: Replica) -> None:
        """Healthy from the first 200 on /health until the process exits (a draining or dead engine answers 503
        and then exits, so the exit is what marks it unhealthy)."""
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                try:
                    if (await client.get(r.url + "/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(HEALTH_POLL_S)
        r.healthy = r.ever_healthy = True
        r.ready.set()
        log.info("replica %d is healthy", r.index)

    async def stop(self) -> None:
        """SIGTERM every replica (each drains running requests for its grace period), then wait for them;
        SIGKILL those still running after `stop_timeout_s`."""
        self.stopping = True
        procs = [r.proc for r in self.replicas if r.proc is not None and r.proc.returncode is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), self.stop_timeout_s)
        except asyncio.TimeoutError:
            for p in procs:
                if p.returncode is None:
                    log.error("replica pid %d did not stop within %.0f s: killing it", p.pid, self.stop_timeout_s)
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for t in self._tasks:
            t.cancel()


def _die_with_parent() -> None:
    """In the child before exec: on Linux, SIGTERM it when the front dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def replica_commands(overrides: list[str], n: int, run_dir: str) -> list[list[str]]:
    """`python -m nanovllm.serve` with the front's overrides, one replica each, on 127.0.0.1."""
    own = ("server.host", "server.port", "server.data_parallel", "hydra.run.dir")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in own]
    return [[sys.executable, "-m", "nanovllm.serve", *kept, "server.data_parallel=1", "server.host=127.0.0.1",
             f"hydra.run.dir={os.path.join(run_dir, f'replica{i}')}"] for i in range(n)]


def replica_envs(n: int, gpus: list[str]) -> list[dict[str, str]]:
    """The front's environment for each replica, replica i on GPU gpus[i] when there are GPUs."""
    if gpus and n > len(gpus):
        raise ValueError(f"server.data_parallel={n} needs {n} GPUs, but only {len(gpus)} are visible "
                         f"({','.join(gpus)}): one replica a GPU")
    base = {**os.environ, "NANOVLLM_PROGRESS": os.environ.get("NANOVLLM_PROGRESS", "0")}
    return [{**base, "NANOVLLM_REPLICA": str(i), **({"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else {})}
            for i in range(n)]
