"""The query routes: a site's traffic series, from the warehouse plus the live counts
of what it does not hold yet, cached, with identical concurrent misses sharing one
query."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from flowray.api.auth import Grant, allow_sites
from flowray.api.common import (
    AUTH_RESPONSES,
    Deps,
    Interval,
    Minutes,
    SeriesFormat,
    denied,
    error,
    invalid_response,
    unavailable_response,
)
from flowray.config import Settings
from flowray.core.router import SiteError, normalize_site
from flowray.query import series

INTERVAL_DAYS_MAX = {
    "minute": "query_minute_days_max",
    "hour": "query_hour_days_max",
    "day": "query_day_days_max",
    "week": "query_day_days_max",
    "month": "query_day_days_max",
}


class Point(BaseModel):
    t: str = Field(description="The bucket's start, RFC 3339 on the zone's wall clock")
    count: int
    provisional: bool = Field(
        description="Holds events not processed yet: the count may still change"
    )


class Series(BaseModel):
    """A dense series: every bucket of [start, end), empty ones with count 0."""

    site: str = Field(description="The site's normalized name")
    interval: Interval
    tz: str
    points: list[Point]
    total: int
    watermark: str | None = Field(
        description="Processed up to here (RFC 3339 in the zone); null: nothing yet"
    )


class SingleFlight:
    """Concurrent identical misses share one warehouse query; its answer is cached."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.inflight: dict[str, asyncio.Future[bytes]] = {}

    async def __call__(
        self, key: str, ttl_s: int, produce: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        inflight, timeout_s = self.inflight, self.deps.settings.query_timeout_s
        running = inflight.get(key)
        if running is not None:
            self.deps.metrics.joined.inc()
            return await asyncio.wait_for(asyncio.shield(running), timeout_s)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        inflight[key] = future
        try:
            body = await asyncio.wait_for(produce(), timeout_s)
            await self.deps.cache.set(key, body, ttl_s)
            future.set_result(body)
            return body
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: joiners re-raise it, nobody else must
            raise
        finally:
            del inflight[key]


# Long: one route's declaration (its parameters are its OpenAPI) and its handler,
# which reads in order: name, access, range, cache, live counts, answer.
def router(deps: Deps) -> APIRouter:
    api = APIRouter(tags=["queries"])
    settings, cache, warehouse, live = deps.settings, deps.cache, deps.warehouse, deps.live
    metrics, needs = deps.metrics, deps.needs
    single_flight = SingleFlight(deps)

    @api.get(
        "/v1/sites/{site}/traffic",
        summary="A site's traffic series",
        response_model=Series,
        responses={
            **AUTH_RESPONSES,
            200: {
                "description": "The series (JSON), or CSV for format=csv or Accept: text/csv",
                "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}},
            },
            **invalid_response("A bad site, time, range, interval, zone or format"),
            **unavailable_response("The query took longer than the query timeout"),
        },
    )
    async def traffic(
        request: Request,
        site: str = Path(..., description="The site's host name, e.g. example.com"),
        start: str = Query(..., description="Inclusive start: ISO-8601, date, or epoch ms"),
        end: str = Query(..., description="Exclusive end: ISO-8601, date, or epoch ms"),
        interval: Interval = Query(Interval.MINUTE, description="The buckets' size"),
        tz: str = Query("UTC", description="IANA time zone for buckets and labels"),
        format: SeriesFormat = Query(SeriesFormat.JSON, description="The answer's form"),
        grant: Grant | None = Depends(needs["read"]),
    ) -> Response:
        started = time.perf_counter()
        try:
            name = normalize_site(site)
        except SiteError as exc:
            return error(422, str(exc))
        # Checked on the normalized name, before the cache: a read token never sees
        # another site's data, however the name is cased, dotted or percent-encoded.
        decision = allow_sites(grant, [name])
        if not decision.ok:
            metrics.denied.labels("403").inc()
            return denied(decision)
        step = interval.value
        try:
            zone, start_ms, end_ms = _range(settings, start, end, step, tz)
        except series.RangeError as exc:
            return error(422, str(exc))
        want_csv = format == SeriesFormat.CSV or "text/csv" in request.headers.get("accept", "")
        generation, version, watermark = warehouse.snapshot()
        view = SeriesView(name, start_ms, end_ms, step, zone, tz, version, watermark, want_csv)
        key = f"q1:{generation}:{name}:{start_ms}:{end_ms}:{step}:{tz}:{int(want_csv)}"
        body = await cache.get(key)
        metrics.queries.labels("hit" if body is not None else "miss").inc()
        # An answer with provisional points changes as events arrive: cache it briefly.
        unsettled = watermark is None or end_ms > watermark
        ttl_s = settings.live_cache_ttl_s if unsettled else settings.cache_ttl_s

        async def produce() -> bytes:
            extra = None
            if live is not None and unsettled:
                extra = await live.minutes(name, start_ms, end_ms)
            return await asyncio.to_thread(_render, warehouse, view, extra)

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

    return api


@dataclass(frozen=True)
class SeriesView:
    """One traffic query, parsed: what the answer holds and how it is written."""

    site: str
    start_ms: int
    end_ms: int
    interval: str
    zone: Any
    tz: str
    version: int
    watermark: int | None
    want_csv: bool


def _range(
    settings: Settings, start: str, end: str, interval: str, tz: str
) -> tuple[Any, int, int]:
    """(zone, start_ms, end_ms) of a query; RangeError for a bad or too long one."""
    zone = series.parse_zone(tz)
    start_ms, end_ms = series.parse_time(start, zone), series.parse_time(end, zone)
    days_max = getattr(settings, INTERVAL_DAYS_MAX.get(interval, "query_minute_days_max"))
    series.check_range(start_ms, end_ms, interval, days_max)
    return zone, start_ms, end_ms


def _render(
    warehouse: Minutes, view: SeriesView, live: tuple[np.ndarray, np.ndarray] | None = None
) -> bytes:
    site, start_ms, end_ms = view.site, view.start_ms, view.end_ms
    interval, zone, tz, watermark = view.interval, view.zone, view.tz, view.watermark
    version, want_csv = view.version, view.want_csv
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
