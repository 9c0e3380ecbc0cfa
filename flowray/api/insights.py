"""The insight routes: a site's visitors, pageviews and events over time, in totals with
the previous period, and broken down by a dimension, with filters; and the engine
behind them and behind ``POST /api/v2/query``, which reads the warehouse and the live
facts of what it does not hold yet.

Answers are cached like the traffic series: under the warehouse's generation, briefly
while they hold unprocessed events, and identical concurrent misses share one query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from flowray.api.auth import Grant, allow_sites
from flowray.api.common import (
    AUTH_RESPONSES,
    Deps,
    Interval,
    Unavailable,
    denied,
    error,
    invalid_response,
    unavailable,
    unavailable_response,
)
from flowray.api.queries import SingleFlight, _range
from flowray.core.invariant import require
from flowray.core.router import SiteError, normalize_site
from flowray.query import insights as model
from flowray.query import series
from flowray.query.insights import InsightAnswer, InsightError, InsightQuery
from flowray.warehouse.files import Warehouse

# Live facts of (site, start_ms, end_ms, published cursor): raw rows, or None.
LiveFacts = Callable[[str, int, int], Awaitable[pa.Table | None]]
BREAKDOWN_LIMIT_MAX = 1000
PAGE_MAX = 10_000


class Dimension(StrEnum):
    """What a breakdown groups by; "name" is the event name ("pageview" for page views)."""

    PATH = "path"
    SOURCE = "source"
    UTM_MEDIUM = "utm_medium"
    UTM_CAMPAIGN = "utm_campaign"
    BROWSER = "browser"
    OS = "os"
    DEVICE = "device"
    NAME = "name"


class Compare(StrEnum):
    NONE = "none"
    PREVIOUS_PERIOD = "previous_period"


class Metrics(BaseModel):
    visitors: int | None = None
    pageviews: int | None = None
    events: int | None = None


class InsightPoint(Metrics):
    t: str = Field(description="The bucket's start, RFC 3339 on the zone's wall clock")
    provisional: bool = Field(description="Holds events not processed yet")


class Timeseries(BaseModel):
    site: str
    interval: Interval
    tz: str
    metrics: list[str]
    points: list[InsightPoint]
    totals: Metrics
    watermark: str | None


class Totals(BaseModel):
    site: str
    tz: str
    metrics: Metrics
    previous: Metrics | None = Field(description="The period of equal length just before")
    change: dict[str, float | None] | None = Field(
        description="Percent change from the previous period; null where it had none"
    )
    provisional: bool


class BreakdownRow(Metrics):
    value: str


class Breakdown(BaseModel):
    site: str
    by: Dimension
    page: int
    limit: int
    results: list[BreakdownRow]
    has_more: bool
    provisional: bool


_METRICS_HELP = "Comma-separated: visitors, pageviews, events"
_FILTER_HELP = "DIMENSION:OP:VALUE[|VALUE...], OP is, is_not or contains; repeatable"


@dataclass(frozen=True)
class _Asked:
    """What every insight route is asked: a site, a range in a zone, metrics, filters."""

    site: str
    start: str
    end: str
    tz: str
    metrics: str
    filters: tuple[str, ...]

    def query(self, deps: Deps, limit_of: str, **more: Any) -> InsightQuery:
        """The query; ``limit_of``: the interval whose range limit applies."""
        zone, start_ms, end_ms = _range(deps.settings, self.start, self.end, limit_of, self.tz)
        return InsightQuery(
            site=self.site,
            start_ms=start_ms,
            end_ms=end_ms,
            zone=zone,
            metrics=model.parse_metrics(self.metrics),
            filters=tuple(model.parse_filter(f) for f in self.filters),
            **more,
        )


# Long: three route declarations (their parameters are their OpenAPI) sharing one
# preamble (name, access, query) and one cached, single-flight execution.
def router(deps: Deps) -> APIRouter:
    api = APIRouter(tags=["insights"])
    needs, metrics_seen = deps.needs, deps.metrics
    single_flight = SingleFlight(deps)
    responses: dict[int | str, dict[str, Any]] = {
        **AUTH_RESPONSES,
        **invalid_response("A bad site, range, zone, metric, dimension or filter"),
        **unavailable_response("No insights here, or the query took too long"),
    }

    async def answer(
        grant: Grant | None,
        asked: _Asked,
        render: Callable[[str], Awaitable[dict[str, Any]]],
        extra: str = "",
    ) -> Response:
        started = time.perf_counter()
        try:
            name = normalize_site(asked.site)
        except SiteError as exc:
            return error(422, str(exc))
        decision = allow_sites(grant, [name])
        if not decision.ok:
            metrics_seen.denied.labels("403").inc()
            return denied(decision)
        if deps.insights is None:
            return error(503, "insights are not served here")
        generation, _version, watermark = deps.warehouse.snapshot()
        key = (
            f"i1:{generation}:{name}:{render.__name__}:{extra}:"
            + orjson.dumps(asked.__dict__).decode()
        )
        body = await deps.cache.get(key)
        metrics_seen.queries.labels("hit" if body is not None else "miss").inc()
        settled = watermark is not None
        ttl_s = deps.settings.cache_ttl_s if settled else deps.settings.live_cache_ttl_s

        async def produce() -> bytes:
            return orjson.dumps(await render(name))

        if body is None:
            try:
                body = await single_flight(key, ttl_s, produce)
            except (series.RangeError, InsightError) as exc:
                return error(422, str(exc))
            except Unavailable as exc:
                return unavailable(exc)
            except TimeoutError:
                return error(503, f"query took longer than {deps.settings.query_timeout_s} s")
        elapsed = time.perf_counter() - started
        metrics_seen.query_s.observe(elapsed)
        return Response(
            body,
            media_type="application/json",
            headers={"Server-Timing": f"app;dur={elapsed * 1000:.3f}"},
        )

    async def run(*queries: InsightQuery) -> list[InsightAnswer]:
        """Several queries of one site, on one read of the live facts where the engine
        can (the warehouse's engine can: WarehouseInsights.run_many)."""
        engine = deps.insights
        if engine is None:
            raise Unavailable("insights are not served here")
        many = getattr(engine, "run_many", None)
        if many is not None:
            answers: list[InsightAnswer] = await many(list(queries))
            return answers
        return list(await asyncio.gather(*(engine.run(q) for q in queries)))

    @api.get(
        "/v1/sites/{site}/timeseries",
        summary="Visitors, pageviews and events over time",
        response_model=Timeseries,
        responses=responses,
    )
    async def timeseries(
        site: str = Path(..., description="The site's host name, e.g. example.com"),
        start: str = Query(..., description="Inclusive start: ISO-8601, date, or epoch ms"),
        end: str = Query(..., description="Exclusive end: ISO-8601, date, or epoch ms"),
        interval: Interval = Query(Interval.HOUR, description="The buckets' size"),
        tz: str = Query("UTC", description="IANA time zone for buckets and labels"),
        metrics: str = Query("visitors,pageviews,events", description=_METRICS_HELP),
        filter: list[str] = Query([], description=_FILTER_HELP),  # noqa: A002 - the API's name
        grant: Grant | None = Depends(needs["read"]),
    ) -> Response:
        asked = _Asked(site, start, end, tz, metrics, tuple(filter))

        async def points(name: str) -> dict[str, Any]:
            step = interval.value
            query = asked.query(deps, step, interval=step)
            query = _with_site(query, name)
            found, total = await run(query, _whole(query))
            return _series_body(query, found, total, asked.tz)

        return await answer(grant, asked, points, interval.value)

    @api.get(
        "/v1/sites/{site}/totals",
        summary="A range's visitors, pageviews and events, and the previous period's",
        response_model=Totals,
        responses=responses,
    )
    async def totals(
        site: str = Path(..., description="The site's host name, e.g. example.com"),
        start: str = Query(..., description="Inclusive start: ISO-8601, date, or epoch ms"),
        end: str = Query(..., description="Exclusive end: ISO-8601, date, or epoch ms"),
        tz: str = Query("UTC", description="IANA time zone of dates without one"),
        metrics: str = Query("visitors,pageviews,events", description=_METRICS_HELP),
        filter: list[str] = Query([], description=_FILTER_HELP),  # noqa: A002 - the API's name
        compare: Compare = Query(Compare.PREVIOUS_PERIOD, description="What to compare with"),
        grant: Grant | None = Depends(needs["read"]),
    ) -> Response:
        asked = _Asked(site, start, end, tz, metrics, tuple(filter))

        async def sums(name: str) -> dict[str, Any]:
            query = _with_site(asked.query(deps, "day"), name)
            if compare == Compare.NONE:
                (now,), before = await run(query), None
            else:
                now, before = await run(query, query.previous())
            return _totals_body(query, now, before, asked.tz)

        return await answer(grant, asked, sums, compare.value)

    @api.get(
        "/v1/sites/{site}/breakdown",
        summary="Top values of a dimension, with their visitors, pageviews and events",
        response_model=Breakdown,
        responses=responses,
    )
    async def breakdown(
        site: str = Path(..., description="The site's host name, e.g. example.com"),
        by: Dimension = Query(..., description="The dimension to group by"),
        start: str = Query(..., description="Inclusive start: ISO-8601, date, or epoch ms"),
        end: str = Query(..., description="Exclusive end: ISO-8601, date, or epoch ms"),
        tz: str = Query("UTC", description="IANA time zone of dates without one"),
        metrics: str = Query("visitors,pageviews,events", description=_METRICS_HELP),
        filter: list[str] = Query([], description=_FILTER_HELP),  # noqa: A002 - the API's name
        limit: int = Query(10, ge=1, le=BREAKDOWN_LIMIT_MAX, description="Rows per page"),
        page: int = Query(1, ge=1, le=PAGE_MAX, description="Which page, from 1"),
        order_by: str | None = Query(None, description="A metric; default: the first"),
        grant: Grant | None = Depends(needs["read"]),
    ) -> Response:
        asked = _Asked(site, start, end, tz, metrics, tuple(filter))

        async def top(name: str) -> dict[str, Any]:
            order = ((order_by, "desc"),) if order_by else ()
            query = asked.query(
                deps,
                "day",
                dimensions=(by.value,),
                limit=limit + 1,
                offset=(page - 1) * limit,
                order_by=order,
            )
            (found,) = await run(_with_site(query, name))
            rows = [
                {"value": r[0], **dict(zip(query.metrics, r[1:], strict=True))}
                for r in found.rows[:limit]
            ]
            return {
                "site": name,
                "by": by.value,
                "page": page,
                "limit": limit,
                "results": rows,
                "has_more": len(found.rows) > limit,
                "provisional": found.provisional,
            }

        return await answer(grant, asked, top, f"{by.value}:{limit}:{page}:{order_by}")

    return api


def _with_site(query: InsightQuery, site: str) -> InsightQuery:
    return dataclasses.replace(query, site=site)


def _whole(query: InsightQuery) -> InsightQuery:
    """The query's totals: no buckets, no dimensions."""
    return dataclasses.replace(query, interval=None, dimensions=(), order_by=())


def _metrics(query: InsightQuery, answer: InsightAnswer) -> dict[str, int]:
    row = answer.rows[0] if answer.rows else (0,) * len(query.metrics)
    return {m: int(v or 0) for m, v in zip(query.metrics, row, strict=True)}


def _series_body(
    query: InsightQuery, found: InsightAnswer, total: InsightAnswer, tz: str
) -> dict[str, Any]:
    interval = str(query.interval)
    starts = series.bucket_starts(query.start_ms, query.end_ms, interval, query.zone)
    labels = series.labels(starts, query.zone, interval)
    by_start = {int(row[0]): row[1:] for row in found.rows}
    zero = (0,) * len(query.metrics)
    watermark = found.watermark
    ends = [*starts[1:].tolist(), query.end_ms]
    points = [
        {
            "t": label,
            **{m: int(v or 0) for m, v in zip(query.metrics, by_start.get(s, zero), strict=True)},
            "provisional": watermark is None or end > watermark,
        }
        for s, label, end in zip(starts.tolist(), labels, ends, strict=True)
    ]
    return {
        "site": query.site,
        "interval": interval,
        "tz": tz,
        "metrics": list(query.metrics),
        "points": points,
        "totals": _metrics(query, total),
        "watermark": _label(watermark, query),
    }


def _totals_body(
    query: InsightQuery, now: InsightAnswer, before: InsightAnswer | None, tz: str
) -> dict[str, Any]:
    current = _metrics(query, now)
    previous = None if before is None else _metrics(query, before)
    change = None
    if previous is not None:
        change = {
            m: round((current[m] - b) * 100 / b, 1) if b else None for m, b in previous.items()
        }
    return {
        "site": query.site,
        "tz": tz,
        "metrics": current,
        "previous": previous,
        "change": change,
        "provisional": now.provisional,
    }


def _label(epoch_ms: int | None, query: InsightQuery) -> str | None:
    if epoch_ms is None:
        return None
    return series.labels(np.array([epoch_ms], dtype=np.int64), query.zone, "minute")[0]


class WarehouseInsights:
    """The engine: a query's rows from the warehouse's current version plus the live
    facts of the blocks it does not hold yet, off the event loop, within the query
    timeout."""

    def __init__(self, warehouse: Warehouse, live: LiveFacts | None, timeout_s: float) -> None:
        self.warehouse, self.live, self.timeout_s = warehouse, live, timeout_s

    async def run(self, query: InsightQuery) -> InsightAnswer:
        (answer,) = await self.run_many([query])
        return answer

    async def run_many(self, queries: list[InsightQuery]) -> list[InsightAnswer]:
        """Queries of one site, against one catalog snapshot and one read of the live
        facts (over the union of their ranges), so their answers agree."""
        require(len({q.site for q in queries}) == 1, "run_many: queries of one site")
        _generation, version, watermark = self.warehouse.snapshot()
        start_ms, end_ms = min(q.start_ms for q in queries), max(q.end_ms for q in queries)
        unsettled = watermark is None or end_ms > watermark
        live = None
        if self.live is not None and unsettled:
            live = await self.live(queries[0].site, start_ms, end_ms)

        def answer_all() -> list[InsightAnswer]:
            return [
                InsightAnswer(
                    q.columns,
                    self.warehouse.insight(q, version, live),
                    watermark is None or q.end_ms > watermark,
                    watermark,
                )
                for q in queries
            ]

        return await asyncio.wait_for(asyncio.to_thread(answer_all), self.timeout_s)
