"""The front of a data-parallel server (`server.data_parallel=N`): one OpenAI endpoint over N replicas.

Each replica is the ordinary server (`python -m nanovllm.serve`) on an internal port (nanovllm/serve/replicas.py).
The front proxies every route byte for byte (streams event by event) to the replica the router picks
(nanovllm/serve/router.py: least outstanding requests, with prefix affinity), and answers three itself:
`/health` (200 while any replica is healthy, the body listing each), `/metrics` (every replica's metrics,
labelled `replica="i"`, and the totals; nanovllm/serve/metrics_merge.py) and, while it drains, 503.

A replica that dies fails its requests cleanly: a stream gets an error event and [DONE], any other request a 503
(`code: replica_failed`); the replica is restarted. The first SIGTERM drains: new requests get 503, each replica
gets SIGTERM and drains its running requests for its `server.shutdown_grace_s`, then the front exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from nanovllm.serve.app import BodySizeLimit
from nanovllm.serve.errors import error_body, error_json, install_error_handlers
from nanovllm.serve.metrics_merge import Families, merge_families
from nanovllm.serve.replicas import ReplicaSet
from nanovllm.serve.router import Router, affinity_key
from nanovllm.serve.server import CLOSE_TIMEOUT_S, GracefulServer

log = logging.getLogger("nanovllm.serve")

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
# hop-by-hop headers (RFC 9110 7.6.1) and those httpx / starlette set themselves
DROP_REQUEST = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
                "upgrade", "proxy-authorization", "proxy-connection"}
DROP_RESPONSE = {"content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
REPLICA_HEADER = "x-nanovllm-replica"  # which replica answered


class ReplicaFailed(Exception):
    pass


def _sse_error(message: str, code: str) -> bytes:
    return f"data: {json.dumps(error_body(503, message, code=code))}\n\ndata: [DONE]\n\n".encode()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Front:
    def __init__(self, replicas: ReplicaSet, router: Router, prefix_chars: int):
        self.replicas, self.router, self.prefix_chars = replicas, router, prefix_chars
        self.draining = False
        self.affinity = {"hit": [0] * len(replicas.replicas), "miss": [0] * len(replicas.replicas)}
        # no pool limit (the replicas' queues bound the work); idle connections expire before uvicorn's
        # keep-alive timeout closes them, so a request is never sent on a connection the replica is closing
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                        limits=httpx.Limits(max_connections=None, keepalive_expiry=2.0))

    async def proxy(self, request: Request) -> Response:
        if self.draining:
            return error_json(503, "the server is shutting down", code="server_shutting_down")
        body = await request.body()
        healthy = self.replicas.healthy()
        if not healthy:
            return error_json(503, "no replica is running (they are restarting)", code="no_replica_available")
        key = affinity_key(body, self.prefix_chars) if body and request.method == "POST" else None
        i, hit = self.router.choose(healthy, key)
        if key is not None:
            self.affinity["hit" if hit else "miss"][i] += 1
        self.router.started(i)
        handed_over = False
        try:
            fetch = asyncio.ensure_future(self._fetch(request, body, i))
            gone = asyncio.ensure_future(_until_disconnected(request))
            try:
                await asyncio.wait({fetch, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not fetch.done():  # the client went away: dropping the upstream connection aborts its request
                fetch.cancel()
                return Response(status_code=499)
            try:
                upstream = fetch.result()
            except ReplicaFailed as e:
                return error_json(503, str(e), code="replica_failed")
            if isinstance(upstream, Response):
                return upstream
            handed_over = True  # the stream's relay ends the request
            return StreamingResponse(self._relay(upstream, i), status_code=upstream.status_code,
                                     headers=self._headers(upstream, i))
        finally:
            if not handed_over:
                self.router.finished(i)

    async def _fetch(self, request: Request, body: bytes, i: int):
        """The replica's whole answer as a Response, or its open httpx response when it is a stream."""
        replica = self.replicas.replicas[i]
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROP_REQUEST]
        url = replica.url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            upstream = await self.client.send(self.client.build_request(request.method, url, headers=headers,
                                                                        content=body), stream=True)
        except httpx.HTTPError as e:
            raise ReplicaFailed(f"replica {i} failed before answering ({type(e).__name__}); retry the request") \
                from None
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return upstream
        try:
            content = await upstream.aread()
        except httpx.HTTPError as e:
            raise ReplicaFailed(f"replica {i} failed while answering ({type(e).__name__}); retry the request") \
                from None
        finally:
            await upstream.aclose()
        return Response(content, upstream.status_code, headers=self._headers(upstream, i))

    @staticmethod
    def _headers(upstream: httpx.Response, i: int) -> dict[str, str]:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_RESPONSE}
        headers[REPLICA_HEADER] = str(i)
        return headers

    async def _relay(self, upstream: httpx.Response, i: int):
        """The replica's events as they come, whole events only; if the replica dies mid-stream, an error event
        and [DONE] instead of the partial event."""
        pending = b""
        try:
            async for chunk in upstream.aiter_raw():
                pending += chunk
                end = pending.rfind(b"\n\n")
                if end >= 0:
                    yield pending[:end + 2]
                    pending = pending[end + 2:]
            if pending:
                yield pending
        except httpx.HTTPError as e:
            log.warning("replica %d failed mid-stream: %s", i, type(e).__name__)
            yield _sse_error(f"replica {i} failed while streaming this request; retry it", "replica_failed")
        finally:
            self.router.finished(i)
            with anyio.CancelScope(shield=True):  # also when the client went away and the relay is cancelled
                await upstream.aclose()

    async def health(self) -> Response:
        if self.draining:
            return error_json(503, "the server is shutting down", code="server_shutting_down")
        replicas = [r.describe() for r in self.replicas.replicas]
        healthy = self.replicas.healthy()
        if not healthy:
            return error_json(503, "no replica is healthy", code="no_replica_available")
        status = "ok" if len(healthy) == len(replicas) else "degraded"
        return Response(json.dumps({"status": status, "replicas": replicas}), media_type="application/json")

    async def metrics(self) -> Response:
        async def scrape(i: int) -> tuple[int, str | None]:
            try:
                r = await self.client.get(self.replicas.replicas[i].url + "/metrics", timeout=5)
                return i, r.text if r.status_code == 200 else None
            except httpx.HTTPError:
                return i, None
        texts = {i: text for i, text in await asyncio.gather(*map(scrape, self.replicas.healthy())) if text}
        families = merge_families(texts) + self._own_families()
        return Response(generate_latest(Families(families)), media_type=CONTENT_TYPE_LATEST)

    def _own_families(self) -> list:
        up = GaugeMetricFamily("nanovllm:dp_replica_up", "1 while the replica is healthy", labels=["replica"])
        outstanding = GaugeMetricFamily("nanovllm:dp_outstanding_requests",
                                        "requests the front has sent to the replica and not yet relayed in full",
                                        labels=["replica"])
        restarts = CounterMetricFamily("nanovllm:dp_replica_restarts", "times the replica was restarted",
                                       labels=["replica"])
        routed = CounterMetricFamily("nanovllm:dp_routed_requests", "requests with a prompt routed to the replica: "
                                     "affinity=hit when it already served their prefix", labels=["replica", "affinity"])
        for r in self.replicas.replicas:
            label = str(r.index)
            up.add_metric([label], float(r.healthy))
            outstanding.add_metric([label], self.router.outstanding[r.index])
            restarts.add_metric([label], r.restarts)
            for kind, counts in self.affinity.items():
                routed.add_metric([label, kind], counts[r.index])
        return [up, outstanding, restarts, routed]

    async def drain(self, timeout_s: float) -> None:
        """New requests get 503; every replica drains (SIGTERM) and exits; the relays of their last answers end."""
        self.draining = True
        await self.replicas.stop()
        deadline = time.monotonic() + timeout_s
        while sum(self.router.outstanding) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def create_front_app(front: Front, max_body_bytes: int, give_up=lambda: False) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        front.replicas.start()
        try:
            if not await front.replicas.wait_all_ready(give_up):
                raise RuntimeError(front.replicas.failed or "stopped before every replica was healthy")
            log.info("all %d replicas are healthy", len(front.replicas.replicas))
            yield
        finally:
            await front.replicas.stop()
            await front.client.aclose()

    # /docs and /openapi.json are the replicas' (proxied): the front adds no API of its own
    app = FastAPI(title="nano-vllm (data parallel)", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    install_error_handlers(app, lambda status: None)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, on_reject=lambda status: None)
    app.add_api_route("/health", front.health, methods=["GET"])
    app.add_api_route("/metrics", front.metrics, methods=["GET"])
    app.add_api_route("/{path:path}", front.proxy, methods=METHODS)
    return app


def run_front(cfg, overrides: list[str], run_dir: str) -> int:
    """Serve `cfg.server.data_parallel` replicas behind one endpoint until a signal; 0 after a clean shutdown,
    1 if a replica could not start."""
    from nanovllm.serve.replicas import replica_commands, replica_envs
    from nanovllm.sweep import visible_gpus

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied request
    server = cfg.server
    n = int(server.data_parallel)
    gpus = [] if str(cfg.device) == "cpu" else visible_gpus()
    replicas = ReplicaSet(replica_commands(overrides, n, run_dir), replica_envs(n, gpus),
                          stop_timeout_s=float(server.shutdown_grace_s) + 30)
    front = Front(replicas, Router(n, server.affinity_slack), server.affinity_prefix_chars)
    holder: dict = {}
    app = create_front_app(front, server.max_body_bytes, give_up=lambda: holder["server"].should_exit)

    async def drain() -> None:
        await front.drain(float(server.shutdown_grace_s) + 30)

    config = uvicorn.Config(app, host=server.host, port=server.port, log_level=server.log_level,
                            timeout_graceful_shutdown=CLOSE_TIMEOUT_S)
    holder["server"] = uvicorn_server = GracefulServer(config, drain)
    uvicorn_server.run()
    if replicas.failed or not (uvicorn_server.started or uvicorn_server.draining):
        log.error("exiting with status 1: %s", replicas.failed or "the front did not start")
        return 1
    return 0
