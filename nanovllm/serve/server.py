"""Running the app under uvicorn with graceful shutdown and an exit status a supervisor can act on.

The first SIGTERM (or SIGINT) does not stop uvicorn at once: it starts the app's drain (`app.state.drain`):
/health and new requests answer 503 with Retry-After while running requests get `server.shutdown_grace_s`
to finish, then each unfinished stream ends with an error event and [DONE] (a non-streamed request with a
503 error). Only then does uvicorn close its connections and stop. A second signal stops at once.
If the engine stops for good (see AsyncEngine), the server stops too and `run_server` returns 1.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

log = logging.getLogger("nanovllm.serve")

CLOSE_TIMEOUT_S = 5  # after the drain: how long uvicorn waits for connections to close before cutting them


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self.drain = drain
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.draining or self._loop is None:  # a second signal, or one before startup: stop now
            return super().handle_exit(sig, frame)
        self.draining = True  # the signal is not recorded, so uvicorn does not raise it again once stopped
        log.info("signal %d: draining (a second signal stops at once)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain()
        except Exception:
            log.exception("draining failed; stopping now")
        self.should_exit = True

    def stop_soon(self) -> None:
        """Stop without draining (the engine has died: nothing is left to finish)."""
        self.should_exit = True


def run_server(app, host: str, port: int, log_level: str = "info") -> int:
    """Serve `app` (from create_app) until a signal or the engine's death; 0 after a clean shutdown, 1 if the
    engine died."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=CLOSE_TIMEOUT_S)
    server = GracefulServer(config, app.state.drain)
    engine = app.state.serve.engine
    engine.on_dead.append(server.stop_soon)
    server.run()
    if engine.error is not None:
        log.error("exiting with status 1: the engine stopped: %r", engine.error)
        return 1
    return 0
