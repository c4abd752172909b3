"""Runs the LLMEngine, which is not thread-safe, on one thread that owns it, and bridges it to asyncio.

Requests and aborts reach the engine thread through a command queue that it drains between steps, so
every request that arrives while others decode joins the next step (continuous batching). Outputs go
back to the event loop once per step via `loop.call_soon_threadsafe` and are handed to per-request
asyncio queues there. With nothing to run, the thread blocks on the command queue instead of spinning.
Prompts reach the engine as token ids (nanovllm/serve/prompts.py tokenizes them elsewhere), so nothing a
client sends makes the engine thread wait; a request the engine refuses fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from nanovllm.engine.llm_engine import LLMEngine, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.serve.metrics import Metrics

log = logging.getLogger("nanovllm.serve")

_STOP = ("stop",)


class QueueFullError(Exception):
    """More requests are waiting than server.max_queued_requests allows (HTTP 429)."""


class EngineDeadError(Exception):
    """The engine thread hit an unexpected error and stopped (HTTP 503 / 500)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published by the engine thread after each step (read from the event loop)."""
    waiting: int = 0
    running: int = 0
    free_blocks: int = 0
    num_blocks: int = 0
    steps: int = 0            # engine steps that ran a batch
    max_running: int = 0      # the most sequences one step has decoded together


class _Request:
    __slots__ = ("index", "queue", "t_arrival", "t_last")

    def __init__(self, index: int, q: asyncio.Queue, now: float):
        self.index, self.queue, self.t_arrival, self.t_last = index, q, now, None


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_queued_requests: int = 256):
        self.engine = engine
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self.stats = EngineStats(num_blocks=engine.block_manager.num_blocks,
                                 free_blocks=engine.block_manager.num_free_blocks)
        self.error: BaseException | None = None
        self._commands: queue.Queue = queue.Queue()
        self._requests: dict[str, _Request] = {}  # touched only on the event loop
        self._pending_adds = 0                    # engine requests sent but not yet added by the thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle (event loop side) -------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
            self._fail_queued(EngineDeadError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_queued(self) -> int:
        return self.stats.waiting + self._pending_adds

    # -- requests (event loop side) --------------------------------------------------------------------
    def stream(self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]) -> RequestStream:
        """Engine requests `{request_id}-{i}`, one per (token ids, params) pair; use as `async with`."""
        return RequestStream(self, [f"{request_id}-{i}" for i in range(len(prompts))], prompts, params)

    async def _add(self, ids: list[str], prompts: list, params: list[SamplingParams], q: asyncio.Queue) -> None:
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        if self.num_queued + len(ids) > self.max_queued_requests:
            raise QueueFullError(f"too many queued requests ({self.num_queued} waiting, at most "
                                 f"{self.max_queued_requests}); retry later")
        now = time.perf_counter()
        for i, rid in enumerate(ids):
            self._requests[rid] = _Request(i, q, now)
        done = self._loop.create_future()
        self._pending_adds += len(ids)
        self._commands.put(("add", ids, prompts, params, done))
        try:
            await done  # ValueError for a bad prompt: nothing of this request was added
        except asyncio.CancelledError:
            raise  # the stream's close() aborts them (the add may still be queued)
        except BaseException:
            for rid in ids:
                self._requests.pop(rid, None)
            raise
        finally:
            self._pending_adds -= len(ids)

    def _abort(self, ids: list[str]) -> None:
        live = [rid for rid in ids if self._requests.pop(rid, None) is not None]
        if live:
            self.metrics.requests.labels("abort").inc(len(live))
        self._commands.put(("abort", ids))  # also for ids whose add is still queued (FIFO keeps order)

    def _dispatch(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """On the loop: hand one step's outputs to their requests (aborted ones are dropped)."""
        self.stats = stats
        now = time.perf_counter()
        m = self.metrics
        for out in outputs:
            r = self._requests.get(out.request_id)
            if r is None:
                continue
            n = len(out.token_ids)
            if n:
                if r.t_last is None:
                    m.ttft.observe(now - r.t_arrival)
                else:
                    m.itl.observe((now - r.t_last) / n)
                r.t_last = now
                m.add_generated(n, now)
            if out.finished:
                del self._requests[out.request_id]
                m.requests.labels(out.finish_reason or "stop").inc()
                m.prompt_tokens.inc(out.num_prompt_tokens)
                m.e2e.observe(now - r.t_arrival)
            r.queue.put_nowait((r.index, out))

    def _resolve(self, fut: asyncio.Future, error: BaseException | None) -> None:
        if not fut.done():  # the waiting handler may have been cancelled by a disconnect
            fut.set_exception(error) if error else fut.set_result(None)

    def _fail_all(self, error: BaseException) -> None:
        self.error = error
        dead = EngineDeadError(f"the engine stopped: {error!r}")
        for rid, r in list(self._requests.items()):
            r.queue.put_nowait(dead)
            self.metrics.requests.labels("error").inc()
            del self._requests[rid]
        self._fail_queued(dead)

    def _fail_queued(self, error: BaseException) -> None:
        """Answer the adds that the stopped thread will never read, so no handler waits forever."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                self._resolve(cmd[-1], error)

    # -- the engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished()
                for cmd in self._take_commands(block=idle):
                    if cmd is _STOP:
                        return
                    self._apply(cmd)
                outputs = self.engine.step() if self.engine.has_unfinished() else []
                self._loop.call_soon_threadsafe(self._dispatch, outputs, self._snapshot(bool(outputs)))
        except BaseException as e:  # a bug in the engine: fail every request loudly instead of hanging them
            log.exception("engine thread failed; failing all requests")
            self._loop.call_soon_threadsafe(self._fail_all, e)

    def _take_commands(self, block: bool) -> list:
        cmds = [self._commands.get()] if block else []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _apply(self, cmd) -> None:
        if cmd[0] == "abort":
            for rid in cmd[1]:
                self.engine.abort_request(rid)
            return
        _, ids, prompts, params, done = cmd
        try:  # check every prompt before adding any
            token_ids = [self.engine.tokenize(p) for p in prompts]
        except Exception as e:  # ValueError: the client's mistake (400); anything else fails this request alone
            self._loop.call_soon_threadsafe(self._resolve, done, e)
            return
        for rid, ids_, sp in zip(ids, token_ids, params):
            self.engine.add_request(ids_, sp, rid)
        self._loop.call_soon_threadsafe(self._resolve, done, None)

    def _snapshot(self, stepped: bool) -> EngineStats:
        sched, bm, s = self.engine.scheduler, self.engine.block_manager, self.stats
        running = len(sched.running)
        return EngineStats(waiting=len(sched.waiting), running=running, free_blocks=bm.num_free_blocks,
                           num_blocks=bm.num_blocks, steps=s.steps + stepped,
                           max_running=max(s.max_running, running))


class RequestStream:
    """One HTTP request's engine requests. `async with` adds them (ValueError / QueueFullError on the
    way in) and aborts whatever is unfinished on the way out, so a disconnect frees its KV blocks.
    Iterating yields (index, RequestOutput) in arrival order until every request has finished."""

    def __init__(self, engine: AsyncEngine, ids: list[str], prompts: list, params: list[SamplingParams]):
        self.engine, self.ids, self.prompts, self.params = engine, ids, prompts, params
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = set(range(len(ids)))
        self.closed = False

    async def open(self) -> RequestStream:
        try:
            await self.engine._add(self.ids, self.prompts, self.params, self.queue)
        except asyncio.CancelledError:
            self.close()
            raise
        return self

    async def __aenter__(self) -> RequestStream:
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            unfinished = [self.ids[i] for i in self.unfinished]
            if unfinished:
                self.engine._abort(unfinished)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.unfinished.clear()
            raise item
        index, out = item
        if out.finished:
            self.unfinished.discard(index)
        return index, out
