"""The ingest routes: POST /v1/events and /v1/logs, through FastAPI (for OpenAPI and
Serve) and straight on ASGI (the gateway's fast path); both run the same handler."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from flowray.api.auth import Grant, allow_sites
from flowray.api.common import (
    AUTH_RESPONSES,
    Deps,
    Problem,
    Unavailable,
    denied,
    error,
    unavailable_response,
)
from flowray.ingest import events as ev
from flowray.ingest.pieces import Routing, route, routing_for
from flowray.ingest.rules import RULES


def events_parser(content_type: str | None) -> Callable[[bytes, ev.Limits], ev.Events]:
    ctype = (content_type or "").split(";")[0].strip().lower()
    return ev.parse_ndjson_events if ctype == "application/x-ndjson" else ev.parse_json_events


async def read_asgi_body(headers: Headers, receive: Receive, limit: int) -> bytes | JSONResponse:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return error(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return error(400, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return error(413, f"body larger than {limit} bytes")
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


class IngestHandler:
    """Parse, authorize, route and commit one ingest request's body."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.settings, self.metrics = deps.settings, deps.metrics

    async def accept(
        self, request: Request, parse: Callable[[bytes, ev.Limits], ev.Events], grant: Grant | None
    ) -> Response:
        started = time.perf_counter()
        body = await read_asgi_body(request.headers, request.receive, self.settings.body_bytes_max)
        return await self.accept_body(body, parse, grant, started)

    def limits_now(self, routing: Routing | None) -> ev.Limits:
        return ev.Limits(
            now_ms=int(self.deps.clock() * 1000),
            future_skew_ms=int(self.settings.future_skew_s * 1000),
            batch_events_max=self.settings.batch_events_max,
            routing=routing,
        )

    def warm(self) -> None:
        """Parse and route (not commit) a body of each form, small and large: their
        first use loads what they need lazily (numpy.ma, for one: 8 of the 9 ms that a
        first request took in a gateway, on the reference machine)."""
        shard_map = self.deps.current_map()
        now_ms = int(self.deps.clock() * 1000)
        for count in (1, min(WARM_EVENTS, self.settings.batch_events_max)):
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
                route(parse(body, self.limits_now(routing)), shard_map, routing)

    async def accept_body(
        self,
        body: bytes | JSONResponse,
        parse: Callable[[bytes, ev.Limits], ev.Events],
        grant: Grant | None,
        started: float,
    ) -> Response:
        if isinstance(body, JSONResponse):
            self.metrics.rejected.labels("413").inc()
            return body
        shard_map = self.deps.current_map()
        routing = routing_for(shard_map)
        limits = self.limits_now(routing)
        try:
            if len(body) > PARSE_INLINE_BYTES_MAX:
                # Arrow and C parse a large body with the GIL released: on a worker
                # thread it leaves the event loop to the other requests, and uses a
                # second core.
                events = await asyncio.to_thread(parse, body, limits)
            else:
                events = parse(body, limits)
        except ev.BatchRejected as exc:
            self.metrics.rejected.labels("422").inc()
            return error(
                422,
                str(exc),
                total_errors=exc.total_errors,
                errors=[{"position": e.position, "reason": e.reason} for e in exc.errors],
            )
        if grant is not None and grant.scope != "admin":
            decision = allow_sites(grant, ev.event_sites(events))
            if not decision.ok:
                self.metrics.denied.labels("403").inc()
                return denied(decision)
        if self.deps.current_map() != shard_map:  # a shard moved while a large body was parsed
            shard_map, routing = self.deps.current_map(), None
        try:
            if len(body) > PARSE_INLINE_BYTES_MAX:  # its sort and take too, as its parse
                groups = await asyncio.to_thread(route, events, shard_map, routing)
            else:
                groups = route(events, shard_map, routing)
            await self.deps.ingest.commit(groups)
        except Unavailable as exc:
            self.metrics.rejected.labels("503").inc()
            return JSONResponse(
                {"error": str(exc)},
                status_code=503,
                headers={"Retry-After": str(exc.retry_after_s)},
            )
        count = ev.event_count(events)
        self.metrics.events.inc(count)
        self.metrics.commit.observe(time.perf_counter() - started)
        return JSONResponse({"accepted": count})

    async def ingest_asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The two ingest routes straight on ASGI (see :class:`IngestFastPath`)."""
        started = time.perf_counter()
        headers = Headers(scope=scope)
        grant = None
        authorizer = self.deps.authorizer
        if authorizer is not None:
            decision = authorizer.admit(headers.get("authorization"), "ingest")
            if not decision.ok:
                self.metrics.denied.labels(str(decision.status)).inc()
                await denied(decision)(scope, receive, send)
                return
            grant = decision.grant
        body = await read_asgi_body(headers, receive, self.settings.body_bytes_max)
        parse: Callable[[bytes, ev.Limits], ev.Events] = (
            ev.parse_seed_events
            if scope["path"] == "/v1/logs"
            else events_parser(headers.get("content-type"))
        )
        response = await self.accept_body(body, parse, grant, started)
        await response(scope, receive, send)


# --------------------------------------------------------------------------- OpenAPI

# The routes read their bodies raw (see IngestHandler.accept), so FastAPI cannot see
# them: the request bodies are written out here, the event's from the rules the
# parsers check, and the routes carry them as openapi_extra. create_app adds the event
# to the document's components (see components()), where the bodies refer to it.

FIELD_DOCS = {
    "ts": "When the page was viewed: epoch milliseconds (a number, or a string of digits) "
    "or an RFC 3339 time with a zone offset; absent or null: when the server receives it",
    "site": "The site's host name, e.g. example.com; lower-cased, trailing dot dropped, "
    f"IDNA-encoded, at most {RULES.site_bytes_max} bytes then",
    "path": "The page's path",
    "referrer": "The referring page",
    "ua": "The browser's user agent",
    "visitor": "An opaque visitor token",
    "id": "The event's id: events of a site with the same id are counted once; "
    "a number is taken as its decimal text, and an empty id is no id",
}


def event_schema() -> dict[str, Any]:
    """An event as JSON Schema, from :data:`flowray.ingest.rules.RULES`."""
    properties: dict[str, Any] = {}
    for f in RULES.fields:
        kinds: list[dict[str, Any]]
        if f.type == "int64":  # ts: epoch ms, or a time in text
            kinds = [{"type": "integer", "minimum": RULES.ts_min_ms}, {"type": "string"}]
        else:
            text: dict[str, Any] = {"type": "string"}
            if f.chars_limit is not None:
                text["maxLength"] = RULES.chars_max(f.name)
            kinds = [text, *([{"type": "integer"}] if f.numbers_as_text else [])]
        if not f.required:
            kinds.append({"type": "null"})
        one = kinds[0] if len(kinds) == 1 else {"anyOf": kinds}
        properties[f.name] = {**one, "description": FIELD_DOCS.get(f.name, "")}
    return {
        "type": "object",
        "title": "Event",
        "description": "One page view. Other keys are ignored.",
        "properties": properties,
        "required": [f.name for f in RULES.fields if f.required],
        "additionalProperties": True,
    }


EVENT_REF = {"$ref": "#/components/schemas/Event"}


def components() -> dict[str, Any]:
    """The schemas the bodies refer to, for the document's components."""
    return {"Event": event_schema()}


SEED_EXAMPLE = "2020.03.14 07:20:39.595 taobao.com\n2020.03.14 07:25:42.412 tmall.com\n"


def request_body(content: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": content}}


def events_body(batch_events_max: int) -> dict[str, Any]:
    return request_body(
        {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"type": "array", "items": EVENT_REF, "maxItems": batch_events_max},
                        EVENT_REF,
                    ],
                    "description": "An array of events, or one event",
                }
            },
            "application/x-ndjson": {
                "schema": {
                    "type": "string",
                    "description": "One event object per line; blank lines are skipped",
                },
                "example": '{"ts":"2020-03-14T07:20:39.595Z","site":"taobao.com"}\n',
            },
        }
    )


LOGS_BODY = request_body(
    {
        "text/plain": {
            "schema": {
                "type": "string",
                "description": "Seed lines, 'yyyy.mm.dd HH:MM:SS[.fff] site' in UTC, one per "
                "line; blank lines are skipped",
            },
            "example": SEED_EXAMPLE,
        }
    }
)


class Accepted(BaseModel):
    accepted: int = Field(description="Events committed by a majority of their groups")


class ItemProblem(BaseModel):
    position: int = Field(
        description="The item's index in the batch (its line for NDJSON and seed lines), "
        "from 0; -1 for the body as a whole"
    )
    reason: str


class Rejected(Problem):
    """A batch refused whole: every bad item, up to a limit, with its reason."""

    total_errors: int = Field(description="Bad items in the batch (errors may list fewer)")
    errors: list[ItemProblem]


def ingest_responses(what: str) -> dict[int | str, dict[str, Any]]:
    return {
        413: {"model": Problem, "description": "Body too large"},
        422: {"model": Rejected, "description": f"Batch rejected; every bad {what} listed"},
        **unavailable_response("No quorum; retry after Retry-After"),
        **AUTH_RESPONSES,
    }


def router(handler: IngestHandler) -> APIRouter:
    """The two routes through FastAPI; their OpenAPI bodies are written out (see above)."""
    api = APIRouter(tags=["ingest"])
    needs = handler.deps.needs

    @api.post(
        "/v1/events",
        summary="Ingest page-view events (JSON array, object, or NDJSON)",
        response_model=Accepted,
        responses=ingest_responses("item"),
        openapi_extra=events_body(handler.settings.batch_events_max),
    )
    async def post_events(
        request: Request, grant: Grant | None = Depends(needs["ingest"])
    ) -> Response:
        return await handler.accept(
            request, events_parser(request.headers.get("content-type")), grant
        )

    @api.post(
        "/v1/logs",
        summary="Ingest seed-form log lines (text/plain)",
        response_model=Accepted,
        responses=ingest_responses("line"),
        openapi_extra=LOGS_BODY,
    )
    async def post_logs(
        request: Request, grant: Grant | None = Depends(needs["ingest"])
    ) -> Response:
        return await handler.accept(request, ev.parse_seed_events, grant)

    return api
