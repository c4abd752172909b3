"""Runs the LLMEngine, which is not thread-safe, on one thread that owns it, and bridges it to asyncio.

Requests and aborts reach the engine thread through a command queue that it drains between steps, so
every request that arrives while others decode joins the next step (continuous batching). Outputs go
back to the event loop once per step via `loop.call_soon_threadsafe` and are handed to per-request
asyncio queues there. With nothing to run, the thread blocks on the command queue instead of spinning.
Prompts reach the engine as token ids (nanovllm/serve/prompts.py tokenizes them elsewhere), so nothing a
client sends makes the engine thread wait; a request the engine refuses fails alone.

An exception raised by a model step fails the requests of that step alone (nanovllm/serve/step_recovery.py
frees their KV blocks) and the thread goes on; only a failure while recovering, or `max_step_failures`
steps failing in a row, stops the engine for good (`alive` turns False, `on_dead` callbacks run).
`drain(grace_s)` is graceful shutdown: new requests are refused, running ones get `grace_s` to finish,
and whatever is left then fails with ShuttingDownError.
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
from nanovllm.serve.metrics import Metrics, RequestTimes
from nanovllm.serve.step_recovery import fail_step_requests

log = logging.getLogger("nanovllm.serve")

_STOP = ("stop",)


class QueueFullError(Exception):
    """More requests are waiting than server.max_queued_requests allows (HTTP 429)."""


class RequestFailedError(Exception):
    """The server, not the client, failed a request: answered with `status` and the OpenAI error `code`
    (a JSON error, or an SSE error event then [DONE] on a stream)."""
    status, code = 500, "server_error"


class EngineDeadError(RequestFailedError):
    """The engine thread hit an error it cannot recover from and stopped (HTTP 503)."""
    status, code = 503, "engine_dead"


class StepFailedError(RequestFailedError):
    """A model step raised; the requests of that step fail, the engine goes on (HTTP 500)."""
    status, code = 500, "step_failed"


class ShuttingDownError(RequestFailedError):
    """The server is shutting down: refused before it started, or cut after the grace period (HTTP 503)."""
    status, code = 503, "server_shutting_down"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published by the engine thread after each step (read from the event loop)."""
    waiting: int = 0
    running: int = 0
    free_blocks: int = 0
    num_blocks: int = 0
    steps: int = 0            # engine steps that ran a batch
    max_running: int = 0      # the most sequences one step has decoded together
    preemptions: int = 0      # running totals kept by the engine
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_host_hits: int = 0  # of prefix_cache_hits, the tokens that came from the KV host tier
    swapped: int = 0          # waiting sequences swapped out to the KV host tier
    spec_drafts: int = 0      # speculative decoding totals (engine/spec/speculator.py SpecTotals)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()


class _Request:
    __slots__ = ("index", "queue", "times")

    def __init__(self, index: int, q: asyncio.Queue, now: float):
        self.index, self.queue, self.times = index, q, RequestTimes(now)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_queued_requests: int = 256,
                 max_step_failures: int = 3):
        self.engine = engine
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self.max_step_failures = max_step_failures  # consecutive failing steps that stop the engine
        self.draining = False                       # set by drain(): new requests get ShuttingDownError
        self.on_dead: list = []                     # called on the loop once the engine has stopped for good
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
            self._fail_queued(ShuttingDownError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def drain(self, grace_s: float, poll_s: float = 0.05) -> None:
        """Refuse new requests, give the running ones `grace_s` seconds to finish, then fail the rest with
        ShuttingDownError (a stream ends with an error event and [DONE]) and abort them in the engine."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))
        if self._requests:
            ids = list(self._requests)
            log.warning("shutdown grace period (%g s) over: failing %d unfinished requests", grace_s, len(ids))
            self._fail_requests(ids, ShuttingDownError(f"the server is shutting down; the request was not "
                                                        f"finished within the {grace_s:g} s grace period"))
            self._commands.put(("abort", ids))

    @property
    def num_queued(self) -> int:
        return self.stats.waiting + self._pending_adds

    # -- requests (event loop side) --------------------------------------------------------------------
    def stream(self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]) -> RequestStream:
        """Engine requests `{request_id}-{i}`, one per (token ids, params) pair; use as `async with`."""
        return RequestStream(self, [f"{request_id}-{i}" for i in range(len(prompts))], prompts, params)

    async def _add(self, ids: list[str], prompts: list, params: list[SamplingParams], q: asyncio.Queue) -> None:
        if self.draining:
            raise ShuttingDownError("the server is shutting down and accepts no new requests; retry on another "
                                    "replica or after it restarts")
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
        for _ in live:
            self.metrics.requests.labels("abort").inc()
            self.metrics.count_finished("abort")
        self._commands.put(("abort", ids))  # also for ids whose add is still queued (FIFO keeps order)

    def _dispatch(self, outputs: list[RequestOutput], stats: EngineStats, step_start: float = 0.0,
                  prefilling: tuple[str, ...] = ()) -> None:
        """On the loop: hand one step's outputs to their requests (aborted ones are dropped). `prefilling`: the
        requests the step (started at `step_start`) scheduled that have no token yet."""
        self.stats = stats
        now = time.perf_counter()
        m = self.metrics
        m.sync_engine_totals(stats.preemptions, stats.prefix_cache_queries, stats.prefix_cache_hits,
                             stats.prefix_cache_host_hits)
        m.sync_spec_totals(stats.spec_drafts, stats.spec_draft_tokens, stats.spec_accepted_tokens,
                           stats.spec_accepted_per_position)
        for rid in prefilling:
            r = self._requests.get(rid)
            if r is not None and r.times.scheduled is None:
                r.times.scheduled = step_start
        for out in outputs:
            r = self._requests.get(out.request_id)
            if r is None:
                continue
            if r.times.scheduled is None:
                r.times.scheduled = step_start
            if out.token_ids:
                m.observe_tokens(r.times, len(out.token_ids), now)
            if out.finished:
                del self._requests[out.request_id]
                m.observe_finished(r.times, out.finish_reason or "stop", out.num_prompt_tokens,
                                   out.num_completion_tokens, now)
            r.queue.put_nowait((r.index, out))

    def _resolve(self, fut: asyncio.Future, error: BaseException | None) -> None:
        if not fut.done():  # the waiting handler may have been cancelled by a disconnect
            fut.set_exception(error) if error else fut.set_result(None)

    def _fail_requests(self, ids: list[str], error: RequestFailedError) -> None:
        """On the loop: end these engine requests with `error` (their stream raises it)."""
        for rid in ids:
            r = self._requests.pop(rid, None)
            if r is not None:
                r.queue.put_nowait(error)
                self.metrics.count_failed()

    def _fail_all(self, error: BaseException) -> None:
        self.error = error
        dead = EngineDeadError(f"the engine stopped: {error!r}")
        self._fail_requests(list(self._requests), dead)
        self._fail_queued(dead)
        for callback in self.on_dead:
            callback()

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
        failures = 0  # consecutive steps that raised
        try:
            while True:
                idle = not self.engine.has_unfinished()
                for cmd in self._take_commands(block=idle):
                    if cmd is _STOP:
                        return
                    self._apply(cmd)
                if not self.engine.has_unfinished():
                    self._loop.call_soon_threadsafe(self._dispatch, [], self._snapshot(False))
                    continue
                step_start = time.perf_counter()
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    failures += 1
                    self._recover_step(e, failures)
                    continue
                failures = 0
                prefilling = tuple(seq.request_id for seq in self.engine.scheduler.running
                                   if not seq.num_completion_tokens)
                self._loop.call_soon_threadsafe(self._dispatch, outputs, self._snapshot(bool(outputs)), step_start,
                                                prefilling)
        except BaseException as e:  # unrecoverable: fail every request loudly instead of hanging them
            log.exception("engine thread failed; failing all requests")
            self._loop.call_soon_threadsafe(self._fail_all, e)

    def _recover_step(self, error: Exception, failures: int) -> None:
        """On the thread: fail the requests of the step that raised `error` and free their blocks; raises (so the
        engine stops) when recovery itself fails or `max_step_failures` steps in a row have failed."""
        log.error("model step failed (%d in a row); failing the requests of that step", failures, exc_info=error)
        ids = fail_step_requests(self.engine)  # raises if the engine's state cannot be made consistent
        failed = StepFailedError(f"the model step running this request failed: {type(error).__name__}: {error}")
        self._loop.call_soon_threadsafe(self._fail_requests, ids, failed)
        self._loop.call_soon_threadsafe(self._dispatch, [], self._snapshot(False))
        if failures >= self.max_step_failures:
            raise RuntimeError(f"{failures} model steps failed in a row; the last: {error!r}") from error

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
        spec = self.engine.speculator.totals if self.engine.speculator is not None else None
        return EngineStats(waiting=len(sched.waiting), running=running, free_blocks=bm.num_free_blocks,
                           num_blocks=bm.num_blocks, steps=s.steps + stepped,
                           max_running=max(s.max_running, running), preemptions=sched.num_preemptions,
                           prefix_cache_queries=bm.num_prefix_queried_tokens,
                           prefix_cache_hits=bm.num_prefix_hit_tokens,
                           prefix_cache_host_hits=bm.num_prefix_host_hit_tokens, swapped=sched.num_swapped,
                           **({} if spec is None else dict(
                               spec_drafts=spec.num_drafts, spec_draft_tokens=spec.num_draft_tokens,
                               spec_accepted_tokens=spec.num_accepted_tokens,
                               spec_accepted_per_position=tuple(spec.accepted_per_position))))


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
            self.close()  # aborts this request's other choices still in the engine
            self.unfinished.clear()
            raise item
        index, out = item
        if out.finished:
            self.unfinished.discard(index)
        return index, out
