"""Serve an app on a background thread: for tests, notebooks and scripts that need a real server.

    with BackgroundServer(create_app(engine, "tiny")) as server:
        httpx.get(server.url + "/health")

Binds 127.0.0.1 on a free port (the OS picks it), so parallel test runs never collide.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 60.0):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.start_timeout = start_timeout
        self.server = self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        # proto=IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP, and
        # without it Nagle + delayed ACK add ~40 ms to every response
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the server on {self.url} did not start within {self.start_timeout:g} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)


@contextmanager
def serve_model(model: str, model_name: str | None = None, api_key: str | None = None,
                max_queued_requests: int = 256, log_level: str = "warning", max_body_bytes: int = 4 << 20,
                shutdown_grace_s: float = 30.0, max_step_failures: int = 3, **engine_args):
    """Build an engine, serve it on a background thread, and free both on exit. Yields the server; its
    `app.state.serve.engine` is the AsyncEngine (with `.engine`, the LLMEngine)."""
    from nanovllm.config import EngineConfig
    from nanovllm.engine.llm_engine import LLMEngine
    from nanovllm.serve.app import create_app

    engine = LLMEngine(EngineConfig.from_kwargs(str(model), **engine_args))
    try:
        app = create_app(engine, model_name or str(model), api_key, max_queued_requests, max_body_bytes,
                         shutdown_grace_s, max_step_failures)
        with BackgroundServer(app, log_level=log_level) as server:
            yield server
    finally:
        engine.runner.close()
