"""The flowray HTTP API, built by a factory that takes its dependencies.

The factory does no I/O of its own: the ingest path, the warehouse, the admin calls,
the cache and the authorizer come in as arguments, so tests drive the app in-process through
``httpx.ASGITransport`` with fakes or the real things, and the Ray Serve deployment
passes handles to the cluster's actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from flowray.api.auth import Authorizer, Decision, Grant, allow_sites
from flowray.api.dashboard import DASHBOARD_HTML
from flowray.config import Settings
from flowray.core.router import ShardMap, SiteError, normalize_site
from flowray.ingest import events as ev
from flowray.ingest.pieces import GroupEvents, Routing, route, routing_for
from flowray.query import series
from flowray.query.cache import Cache

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No token, or an unknown or revoked one (when auth is enforced)"},
    403: {"description": "The token's scope or sites do not cover this request"},
    429: {"description": "The token's rate limit; retry after Retry-After"},
}
INTERVAL_DAYS_MAX = {
    "minute": "query_minute_days_max",
    "hour": "query_hour_days_max",
    "day": "query_day_days_max",
}


class Unavailable(RuntimeError):
    """A group cannot commit now (no quorum, election, overload): answer 503."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Denied(Exception):
    """Raised by the auth dependency; the app answers with the decision's status."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.error)
        self.decision = decision


class Ingest(Protocol):
    async def commit(self, groups: dict[int, GroupEvents]) -> None:
        """Return once the events of every group are committed by a majority, or raise
        Unavailable."""


class Minutes(Protocol):
    def snapshot(self) -> tuple[int, int, int | None]: ...

    def minutes(
        self, site: str, start_ms: int, end_ms: int, version: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


class Live(Protocol):
    async def minutes(self, site: str, start_ms: int, end_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """Committed (minute_ms, count) of ``site`` that the warehouse does not hold yet."""


class Admin(Protocol):
    async def status(self) -> dict[str, Any]: ...

    async def process(self, mode: str) -> dict[str, Any]: ...

    async def reprocess(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start a re-processing job (raises ValueError for a bad request)."""

    async def rollback(self, to_version: int | None) -> dict[str, Any]:
        """Start a rollback job (raises ValueError when there is nothing to return to)."""

    async def job(self, job_id: str) -> dict[str, Any] | None: ...

    async def versions(self) -> list[dict[str, Any]]: ...

    async def restart(self) -> dict[str, Any]:
        """Start a rolling restart (raises ValueError when one is already running)."""

    async def move_shard(self, shard: int, to_group: int) -> dict[str, Any]:
        """Send a shard's new writes to another group (ValueError for a bad move)."""


class ReprocessRequest(BaseModel):
    """What to re-process: the published hours overlapping [start, end)."""

    model_config = ConfigDict(extra="forbid")
    start: str = Field(description="Inclusive start (ISO-8601, date, or epoch ms)")
    end: str = Field(description="Exclusive end (ISO-8601, date, or epoch ms)")
    tz: str = Field("UTC", description="Time zone of start and end when they carry none")
    sites: list[str] | None = Field(
        None, description="Only these sites (default: every site)", max_length=10_000
    )
    logic: str | None = Field(None, description="Processing logic (default: the current one)")
    logic_modules: list[str] = Field(
        default_factory=list, description="Modules to import that register the logic"
    )
    dry_run: bool = Field(False, description="Report what would change; publish nothing")


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "flowray_ingest_events_total", "Events accepted", registry=self.registry
        )
        self.rejected = Counter(
            "flowray_ingest_rejected_total", "Batches rejected", ["status"], registry=self.registry
        )
        self.commit = Histogram(
            "flowray_ingest_commit_seconds",
            "Ingest latency to commit",
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
        )
        self.queries = Counter(
            "flowray_queries_total", "Traffic queries", ["cache"], registry=self.registry
        )
        gauge = self._gauge
        self.lag = gauge(
            "flowray_replication_lag_entries",
            "Log entries a replica is behind its group's master",
            "group",
            "replica",
        )
        self.up = gauge("flowray_replica_up", "1 when a replica answers", "group", "replica")
        self.term = gauge(
            "flowray_group_term",
            "A group's highest term among its replicas: each failover raises it",
            "group",
        )
        self.has_master = gauge(
            "flowray_group_has_master",
            "1 when a replica of the group answers as its master (0: an election is on, "
            "writes to the group get 503)",
            "group",
        )
        self.is_master = gauge(
            "flowray_replica_is_master",
            "1 for the replica that answers as its group's master",
            "group",
            "replica",
        )
        self.commit_index = gauge(
            "flowray_replica_commit_index",
            "The highest log index a replica knows to be committed",
            "group",
            "replica",
        )
        self.abstaining = gauge(
            "flowray_replica_abstaining",
            "1 while a replica that restarted without its state abstains from votes "
            "until it has caught up",
            "group",
            "replica",
        )
        self.pending = gauge(
            "flowray_blocks_pending", "Blocks sealed but not yet published, per group", "group"
        )
        self.open_blocks = gauge(
            "flowray_blocks_open", "Blocks still taking events, per group", "group"
        )
        self.late = gauge(
            "flowray_late_events",
            "Events for hours already sealed, since the group's master started",
            "group",
        )
        self.last_job_s = gauge(
            "flowray_processing_last_job_seconds", "Duration of the last processing job"
        )
        self.jobs = gauge("flowray_processing_jobs", "Processing jobs since the processor started")
        self.joined = Counter(
            "flowray_query_joined_total",
            "Queries answered by an identical query already running",
            registry=self.registry,
        )
        self.denied = Counter(
            "flowray_auth_denied_total",
            "Requests refused by auth (401, 403, 429)",
            ["status"],
            registry=self.registry,
        )
        self.query_s = Histogram(
            "flowray_query_seconds",
            "Traffic query latency",
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1),
        )

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(name, doc, list(labels), registry=self.registry)


def _cluster_metrics(m: _Metrics, status: dict[str, Any]) -> None:
    """Gauges from the cluster's status, read at scrape time. The master is one that
    says so in the group's highest term (a stale one, cut off in an older term, is
    not); a replica that does not answer has no lag, commit index or abstaining."""
    for group in status.get("groups", []):
        g = str(group.get("group"))
        replicas = group.get("replicas", [])
        terms = [r["term"] for r in replicas if isinstance(r.get("term"), int)]
        top_term = max(terms, default=None)
        masters = [
            r
            for r in replicas
            if r.get("role") == "master" and (top_term is None or r.get("term") == top_term)
        ]
        top = max((r.get("last_index", 0) for r in masters), default=None)
        m.has_master.labels(g).set(1 if masters else 0)
        if top_term is not None:
            m.term.labels(g).set(top_term)
        for r in replicas:
            labels = (g, str(r.get("replica")))
            alive = "last_index" in r
            m.up.labels(*labels).set(1 if alive else 0)
            m.is_master.labels(*labels).set(1 if any(r is x for x in masters) else 0)
            if not alive:
                for gone in (m.lag, m.commit_index, m.abstaining):
                    with contextlib.suppress(KeyError):  # never reported
                        gone.remove(*labels)
                continue
            if top is not None:
                m.lag.labels(*labels).set(max(0, top - r["last_index"]))
            m.commit_index.labels(*labels).set(r.get("commit_index") or 0)
            m.abstaining.labels(*labels).set(1 if r.get("abstaining") else 0)
        for r in masters:
            m.pending.labels(g).set(r.get("sealed_pending") or 0)
            m.open_blocks.labels(g).set(r.get("blocks_open") or 0)
            m.late.labels(g).set(r.get("late_events") or 0)
    processor = status.get("processor") or {}
    if isinstance(processor.get("jobs"), int):
        m.jobs.set(processor["jobs"])
    seconds = (processor.get("last_job") or {}).get("seconds")
    if isinstance(seconds, int | float):
        m.last_job_s.set(seconds)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _denied(decision: Decision) -> JSONResponse:
    return JSONResponse(decision.body(), status_code=decision.status, headers=decision.headers())


GrantDependency = Callable[..., Awaitable[Grant | None]]


def _auth_dependencies(authorizer: Authorizer | None) -> dict[str, GrantDependency]:
    """One FastAPI dependency per kind of route (ingest, read, admin).

    Each yields the request's grant, or None when the app runs open, and raises
    Denied otherwise. Without an authorizer the dependencies do nothing and OpenAPI
    shows no security; with one, OpenAPI shows the bearer scheme on guarded routes.
    """
    if authorizer is None:

        async def open_route() -> Grant | None:
            return None

        return {need: open_route for need in ("ingest", "read", "admin")}
    bearer = HTTPBearer(
        auto_error=False,
        description="A flowray token (`flowray token create`) or FLOWRAY_ADMIN_TOKEN.",
    )

    def guard(need: str) -> GrantDependency:
        async def guarded(
            request: Request,
            _credentials: HTTPAuthorizationCredentials | None = Security(bearer),
        ) -> Grant | None:
            decision = authorizer.admit(request.headers.get("authorization"), need)
            if not decision.ok:
                raise Denied(decision)
            return decision.grant

        return guarded

    return {need: guard(need) for need in ("ingest", "read", "admin")}


def events_parser(content_type: str | None) -> Callable[[bytes, ev.Limits], ev.Events]:
    ctype = (content_type or "").split(";")[0].strip().lower()
    return ev.parse_ndjson_events if ctype == "application/x-ndjson" else ev.parse_json_events


async def read_asgi_body(headers: Headers, receive: Receive, limit: int) -> bytes | JSONResponse:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _error(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return _error(400, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _error(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


INGEST_PATHS = frozenset({"/v1/events", "/v1/logs"})
# The large body that warm() parses: past events.SMALL_BODY_BYTES, so the fast parsers
# run too.
WARM_EVENTS = 1000
# Bodies up to this size are parsed on the event loop: a thread's hand-off cost more
# than the parse once NDJSON was parsed in C (1,000 events, 60 KB, in 0.07 ms). In a
# gateway alone under wrk, CPU per 1,000-event request fell from 0.83-1.16 to
# 0.65-0.75 ms. What a body at the bound holds the loop for (measured per size, and
# scaled): about 0.15 ms in C, 0.6 ms for seed lines, 2 ms through Arrow's reader and
# 3 ms through the exact parser (both rare once the C parser reads escapes and RFC
# 3339 times).
PARSE_INLINE_BYTES_MAX = 128 * 1024


class IngestFastPath:
    """The app, with POST /v1/events and /v1/logs answered straight on ASGI.

    FastAPI's routing, dependency and middleware layers cost more per request than
    parsing a single event and queueing it (see BENCHMARKS.md); the ingest gateway,
    which serves trackers that send one event per request, wraps the app in this.
    The routes behave exactly as the FastAPI ones (same auth, limits, answers and
    metrics: both call the same handler), which stay for OpenAPI and for Serve.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.ingest: ASGIApp = app.state.ingest_asgi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in INGEST_PATHS:
            await self.ingest(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(
    *,
    settings: Settings,
    shard_map: ShardMap | Callable[[], ShardMap],
    ingest: Ingest,
    warehouse: Minutes,
    admin: Admin,
    cache: Cache,
    clock: Callable[[], float] = time.time,
    authorizer: Authorizer | None = None,
    live: Live | None = None,
) -> FastAPI:
    """The API; ``authorizer=None`` serves every route without tokens."""
    # A fixed map, or one that follows shard moves (LiveShardMap).
    current_map: Callable[[], ShardMap] = (
        shard_map if callable(shard_map) else (lambda: shard_map)  # type: ignore[return-value]
    )
    app = FastAPI(
        title="flowray",
        version="0.1.0",
        description="Minute-by-minute web traffic: ingest page views, query per-site series.",
    )
    metrics = _Metrics()
    app.state.metrics = metrics
    app.state.ingest = ingest  # the gateway warms it (RayIngest.warm)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "reason": e.get("msg", "")}
            for e in exc.errors()
        ]
        return _error(422, "invalid request", details=details)

    @app.exception_handler(Denied)
    async def denied(_request: Request, exc: Denied) -> JSONResponse:
        metrics.denied.labels(str(exc.decision.status)).inc()
        return _denied(exc.decision)

    needs = _auth_dependencies(authorizer)

    inflight: dict[str, asyncio.Future[bytes]] = {}

    async def single_flight(key: str, ttl_s: int, produce: Callable[[], Awaitable[bytes]]) -> bytes:
        """Concurrent identical misses share one warehouse query; its answer is cached."""
        running = inflight.get(key)
        if running is not None:
            metrics.joined.inc()
            return await asyncio.wait_for(asyncio.shield(running), settings.query_timeout_s)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        inflight[key] = future
        try:
            body = await asyncio.wait_for(produce(), settings.query_timeout_s)
            await cache.set(key, body, ttl_s)
            future.set_result(body)
            return body
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: joiners re-raise it, nobody else must
            raise
        finally:
            del inflight[key]

    async def accept(
        request: Request, parse: Callable[[bytes, ev.Limits], ev.Events], grant: Grant | None
    ) -> Response:
        started = time.perf_counter()
        body = await read_asgi_body(request.headers, request.receive, settings.body_bytes_max)
        return await accept_body(body, parse, grant, started)

    def limits_now(routing: Routing | None) -> ev.Limits:
        return ev.Limits(
            now_ms=int(clock() * 1000),
            future_skew_ms=int(settings.future_skew_s * 1000),
            batch_events_max=settings.batch_events_max,
            routing=routing,
        )

    def warm() -> None:
        """Parse and route (not commit) a body of each form, small and large: their
        first use loads what they need lazily (numpy.ma, for one: 8 of the 9 ms that a
        first request took in a gateway, on the reference machine)."""
        shard_map = current_map()
        now_ms = int(clock() * 1000)
        for count in (1, min(WARM_EVENTS, settings.batch_events_max)):
            objects = [
                b'{"ts":%d,"site":"s%d.warm.example","path":"/"}' % (now_ms, i)
                for i in range(count)
            ]
            stamp = time.strftime("%Y.%m.%d %H:%M:%S", time.gmtime(now_ms // 1000)).encode()
            forms = (
                (ev.parse_ndjson_events, b"\n".join(objects)),
                (ev.parse_json_events, b"[" + b",".join(objects) + b"]"),
                (
                    ev.parse_seed_events,
                    b"\n".join(b"%s.000 s%d.warm.example" % (stamp, i) for i in range(count)),
                ),
            )
            for parse, body in forms:
                routing = routing_for(shard_map)
                route(parse(body, limits_now(routing)), shard_map, routing)

    app.state.warm = warm

    async def accept_body(
        body: bytes | JSONResponse,
        parse: Callable[[bytes, ev.Limits], ev.Events],
        grant: Grant | None,
        started: float,
    ) -> Response:
        if isinstance(body, JSONResponse):
            metrics.rejected.labels("413").inc()
            return body
        shard_map = current_map()
        routing = routing_for(shard_map)
        limits = limits_now(routing)
        try:
            if len(body) > PARSE_INLINE_BYTES_MAX:
                # Arrow and C parse a large body with the GIL released: on a worker
                # thread it leaves the event loop to the other requests, and uses a
                # second core.
                events = await asyncio.to_thread(parse, body, limits)
            else:
                events = parse(body, limits)
        except ev.BatchRejected as exc:
            metrics.rejected.labels("422").inc()
            return _error(
                422,
                str(exc),
                total_errors=exc.total_errors,
                errors=[{"position": e.position, "reason": e.reason} for e in exc.errors],
            )
        if grant is not None and grant.scope != "admin":
            decision = allow_sites(grant, ev.event_sites(events))
            if not decision.ok:
                metrics.denied.labels("403").inc()
                return _denied(decision)
        if current_map() != shard_map:  # a shard moved while a large body was parsed
            shard_map, routing = current_map(), None
        try:
            if len(body) > PARSE_INLINE_BYTES_MAX:  # its sort and take too, as its parse
                groups = await asyncio.to_thread(route, events, shard_map, routing)
            else:
                groups = route(events, shard_map, routing)
            await ingest.commit(groups)
        except Unavailable as exc:
            metrics.rejected.labels("503").inc()
            return JSONResponse(
                {"error": str(exc)},
                status_code=503,
                headers={"Retry-After": str(exc.retry_after_s)},
            )
        count = ev.event_count(events)
        metrics.events.inc(count)
        metrics.commit.observe(time.perf_counter() - started)
        return JSONResponse({"accepted": count})

    @app.post(
        "/v1/events",
        summary="Ingest page-view events (JSON array, object, or NDJSON)",
        responses={
            413: {"description": "Body too large"},
            422: {"description": "Batch rejected; every bad item listed"},
            503: {"description": "No quorum; retry after Retry-After"},
            **AUTH_RESPONSES,
        },
    )
    async def post_events(
        request: Request, grant: Grant | None = Depends(needs["ingest"])
    ) -> Response:
        return await accept(request, events_parser(request.headers.get("content-type")), grant)

    @app.post(
        "/v1/logs",
        summary="Ingest seed-form log lines (text/plain)",
        responses={
            413: {"description": "Body too large"},
            422: {"description": "Batch rejected; every bad line listed"},
            503: {"description": "No quorum; retry after Retry-After"},
            **AUTH_RESPONSES,
        },
    )
    async def post_logs(
        request: Request, grant: Grant | None = Depends(needs["ingest"])
    ) -> Response:
        return await accept(request, ev.parse_seed_events, grant)

    async def ingest_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        """The two ingest routes straight on ASGI (see :class:`IngestFastPath`)."""
        started = time.perf_counter()
        headers = Headers(scope=scope)
        grant = None
        if authorizer is not None:
            decision = authorizer.admit(headers.get("authorization"), "ingest")
            if not decision.ok:
                metrics.denied.labels(str(decision.status)).inc()
                await _denied(decision)(scope, receive, send)
                return
            grant = decision.grant
        body = await read_asgi_body(headers, receive, settings.body_bytes_max)
        parse: Callable[[bytes, ev.Limits], ev.Events] = (
            ev.parse_seed_events
            if scope["path"] == "/v1/logs"
            else events_parser(headers.get("content-type"))
        )
        response = await accept_body(body, parse, grant, started)
        await response(scope, receive, send)

    app.state.ingest_asgi = ingest_asgi

    @app.get(
        "/v1/sites/{site}/traffic",
        summary="A site's traffic series",
        responses={
            **AUTH_RESPONSES,
            200: {
                "description": "The series (JSON), or CSV for format=csv or Accept: text/csv",
                "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}},
            },
        },
    )
    async def traffic(
        request: Request,
        site: str = Path(..., description="The site's host name, e.g. example.com"),
        start: str = Query(..., description="Inclusive start: ISO-8601, date, or epoch ms"),
        end: str = Query(..., description="Exclusive end: ISO-8601, date, or epoch ms"),
        interval: str = Query("minute", description="minute, hour or day"),
        tz: str = Query("UTC", description="IANA time zone for buckets and labels"),
        format: str = Query("json", description="json or csv"),
        grant: Grant | None = Depends(needs["read"]),
    ) -> Response:
        started = time.perf_counter()
        try:
            name = normalize_site(site)
        except SiteError as exc:
            return _error(422, str(exc))
        # Checked on the normalized name, before the cache: a read token never sees
        # another site's data, however the name is cased, dotted or percent-encoded.
        decision = allow_sites(grant, [name])
        if not decision.ok:
            metrics.denied.labels("403").inc()
            return _denied(decision)
        try:
            zone = series.parse_zone(tz)
            start_ms, end_ms = series.parse_time(start, zone), series.parse_time(end, zone)
            days_max = getattr(settings, INTERVAL_DAYS_MAX.get(interval, "query_minute_days_max"))
            series.check_range(start_ms, end_ms, interval, days_max)
        except series.RangeError as exc:
            return _error(422, str(exc))
        want_csv = format == "csv" or "text/csv" in request.headers.get("accept", "")
        if format not in ("json", "csv"):
            return _error(422, "format must be json or csv")
        generation, version, watermark = warehouse.snapshot()
        key = f"q1:{generation}:{name}:{start_ms}:{end_ms}:{interval}:{tz}:{int(want_csv)}"
        body = await cache.get(key)
        metrics.queries.labels("hit" if body is not None else "miss").inc()
        # An answer with provisional points changes as events arrive: cache it briefly.
        unsettled = watermark is None or end_ms > watermark
        ttl_s = settings.live_cache_ttl_s if unsettled else settings.cache_ttl_s

        async def produce() -> bytes:
            extra = None
            if live is not None and unsettled:
                extra = await live.minutes(name, start_ms, end_ms)
            return await asyncio.to_thread(
                _render,
                warehouse,
                name,
                start_ms,
                end_ms,
                interval,
                zone,
                tz,
                version,
                watermark,
                want_csv,
                extra,
            )

        if body is None:
            try:
                body = await single_flight(key, ttl_s, produce)
            except TimeoutError:
                return JSONResponse(
                    {"error": f"query took longer than {settings.query_timeout_s} s"},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
        elapsed = time.perf_counter() - started
        metrics.query_s.observe(elapsed)
        return Response(
            body,
            media_type="text/csv" if want_csv else "application/json",
            # The handler's own time, so clients can tell it from the network and proxies.
            headers={"Server-Timing": f"app;dur={elapsed * 1000:.3f}"},
        )

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "cache": cache.name, "pid": os.getpid()}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        try:
            status = await asyncio.wait_for(admin.status(), settings.rpc_timeout_s)
        except Exception:  # the cluster's state is unknown now: serve this process's own
            status = {}
        _cluster_metrics(metrics, status)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", summary="Dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML)

    @app.get(
        "/v1/admin/status",
        summary="Groups, replicas, blocks and warehouse versions",
        responses=AUTH_RESPONSES,
        dependencies=[Depends(needs["admin"])],
    )
    async def status() -> dict[str, Any]:
        out = await admin.status()
        out["cache"] = cache.name
        return out

    @app.post(
        "/v1/admin/process",
        summary="Seal and process due blocks now",
        responses=AUTH_RESPONSES,
        dependencies=[Depends(needs["admin"])],
    )
    async def process(
        mode: str = Query("closed", description="due, closed (hour over) or all (open too)"),
    ) -> Response:
        if mode not in ("due", "closed", "all"):
            return _error(422, "mode must be one of due, closed, all")
        try:
            return JSONResponse(await admin.process(mode))
        except Unavailable as exc:
            return _unavailable(exc)

    @app.post(
        "/v1/admin/reprocess",
        summary="Start re-processing a time range (optionally some sites, another logic)",
        status_code=202,
        responses={
            **AUTH_RESPONSES,
            400: {"description": "A body that is not JSON"},
            422: {"description": "A bad range, site, logic or module"},
        },
        dependencies=[Depends(needs["admin"])],
    )
    async def reprocess(body: ReprocessRequest) -> Response:
        try:
            zone = series.parse_zone(body.tz)
            start_ms = series.parse_time(body.start, zone)
            end_ms = series.parse_time(body.end, zone)
            sites = None if body.sites is None else [normalize_site(x) for x in body.sites]
            request = {
                "start_ms": start_ms,
                "end_ms": end_ms,
                "sites": sites,
                "logic": body.logic,
                "modules": body.logic_modules,
                "dry_run": body.dry_run,
            }
            return await _job_started(admin.reprocess(request))
        except (ValueError, SiteError) as exc:
            return _error(422, str(exc))

    @app.post(
        "/v1/admin/rollback",
        summary="Start returning to the previous warehouse version (or a given one)",
        status_code=202,
        responses={**AUTH_RESPONSES, 422: {"description": "Nothing to return to"}},
        dependencies=[Depends(needs["admin"])],
    )
    async def rollback(
        to: int | None = Query(None, description="Version to return to (default: the previous)"),
    ) -> Response:
        try:
            return await _job_started(admin.rollback(to))
        except ValueError as exc:
            return _error(422, str(exc))

    @app.post(
        "/v1/admin/restart",
        summary="Start a rolling restart of every process of the cluster",
        status_code=202,
        responses={**AUTH_RESPONSES, 409: {"description": "A rolling restart is running"}},
        dependencies=[Depends(needs["admin"])],
    )
    async def restart() -> Response:
        try:
            return await _job_started(admin.restart())
        except ValueError as exc:
            return _error(409, str(exc))

    @app.post(
        "/v1/admin/shards/{shard}/move",
        summary="Send a shard's new writes to another group (scaling out)",
        responses={**AUTH_RESPONSES, 422: {"description": "No such shard or group"}},
        dependencies=[Depends(needs["admin"])],
    )
    async def move_shard(
        shard: int = Path(ge=0, le=1_000_000),
        to: int = Query(ge=0, le=1_000_000, description="The group to move the shard to"),
    ) -> Response:
        try:
            return JSONResponse(await admin.move_shard(shard, to))
        except ValueError as exc:
            return _error(422, str(exc))
        except Unavailable as exc:
            return _unavailable(exc)

    @app.get(
        "/v1/admin/jobs/{job_id}",
        summary="Progress and result of a re-processing or rollback job",
        responses={**AUTH_RESPONSES, 404: {"description": "No such job"}},
        dependencies=[Depends(needs["admin"])],
    )
    async def job(job_id: str = Path(max_length=64)) -> Response:
        try:
            state = await admin.job(job_id)
        except Unavailable as exc:
            return _unavailable(exc)
        if state is None:
            return _error(404, f"no job {job_id} (jobs are forgotten when the processor restarts)")
        return JSONResponse(state)

    @app.get(
        "/v1/admin/versions",
        summary="Warehouse versions: logic, parent, units, events, which is current",
        responses=AUTH_RESPONSES,
        dependencies=[Depends(needs["admin"])],
    )
    async def versions() -> Response:
        try:
            return JSONResponse(await admin.versions())
        except Unavailable as exc:
            return _unavailable(exc)

    return app


async def _job_started(call: Awaitable[dict[str, Any]]) -> Response:
    try:
        return JSONResponse(await call, status_code=202)
    except Unavailable as exc:
        return _unavailable(exc)


def _unavailable(exc: Unavailable) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)}
    )


def _render(
    warehouse: Minutes,
    site: str,
    start_ms: int,
    end_ms: int,
    interval: str,
    zone: Any,
    tz: str,
    version: int,
    watermark: int | None,
    want_csv: bool,
    live: tuple[np.ndarray, np.ndarray] | None = None,
) -> bytes:
    minute_ms, counts = warehouse.minutes(site, start_ms, end_ms, version)
    if live is not None and len(live[0]):
        # Live counts cover only blocks the warehouse does not hold: the two add up.
        minute_ms = np.concatenate([minute_ms, live[0]])
        counts = np.concatenate([counts, live[1]])
    starts, totals = series.dense_series(minute_ms, counts, start_ms, end_ms, interval, zone)
    labels = series.labels(starts, zone, interval)
    # A bucket is final only when it ends at or before the watermark: an hour or a day
    # that straddles it can still change.
    ends = np.append(starts[1:], end_ms)
    provisional = np.ones(len(starts), dtype=bool) if watermark is None else ends > watermark
    if want_csv:
        lines = ["t,count,provisional"]
        lines += [
            f"{t},{int(c)},{'true' if p else 'false'}"
            for t, c, p in zip(labels, totals.tolist(), provisional.tolist(), strict=True)
        ]
        return ("\n".join(lines) + "\n").encode()
    points = [
        {"t": t, "count": c, "provisional": p}
        for t, c, p in zip(labels, totals.tolist(), provisional.tolist(), strict=True)
    ]
    wm = None
    if watermark is not None:
        wm = series.labels(np.array([watermark], dtype=np.int64), zone, "minute")[0]
    return orjson.dumps(
        {
            "site": site,
            "interval": interval,
            "tz": tz,
            "points": points,
            "total": int(totals.sum()),
            "watermark": wm,
        }
    )
