"""``POST /api/v2/query``: Plausible's Stats API v2, answered by flowray's insight
queries, so that tools written for Plausible read flowray's numbers.

The translation both ways is the pure :mod:`flowray.query.plausible`; this router only
reads the body, checks the token, runs the planned queries under the query timeout and
answers. Errors take Plausible's shape, ``{"error": "..."}``: 400 for a query it
refuses, 401/403 as every read route, 413 for a body past its limit, 503 when the
insight engine is missing or too slow.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from flowray.api.auth import Grant, allow_sites
from flowray.api.common import (
    AUTH_RESPONSES,
    Deps,
    Insights,
    Problem,
    Unavailable,
    denied,
    error,
    unavailable_response,
)
from flowray.api.queries import INTERVAL_DAYS_MAX
from flowray.config import Settings
from flowray.query import plausible
from flowray.query.insights import InsightAnswer, InsightError
from flowray.query.series import INTERVALS
from flowray.warehouse.sites import SiteRegistry, SitesUnavailable

# A query is a few hundred bytes; this leaves room for long filter lists, no more.
BODY_BYTES_MAX = 64 * 1024

REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["site_id", "metrics", "date_range"],
    "additionalProperties": False,
    "properties": {
        "site_id": {"type": "string", "example": "example.com"},
        "metrics": {
            "type": "array",
            "items": {"type": "string", "enum": ["visitors", "pageviews", "events"]},
        },
        "date_range": {
            "oneOf": [
                {"type": "string", "example": "7d"},
                {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
            ]
        },
        "dimensions": {
            "type": "array",
            "items": {
                "type": "string",
                "enum": [*plausible.TIME_DIMENSIONS, *plausible.DIMENSIONS],
            },
        },
        # [operator, dimension, [values]] or ["and", [filters]]: mixed types.
        "filters": {"type": "array", "items": {"type": "array", "items": {}}},
        "order_by": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
        },
        "include": {
            "type": "object",
            "properties": {k: {"type": "boolean"} for k in plausible.INCLUDE_KEYS},
        },
        "pagination": {
            "type": "object",
            "properties": {"limit": {"type": "integer"}, "offset": {"type": "integer"}},
        },
    },
}
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "metrics": {"type": "array", "items": {"type": "integer"}},
                    "dimensions": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "meta": {"type": "object"},
        "query": {"type": "object"},
    },
}


def days_max_of(settings: Settings) -> dict[str, int]:
    """The longest range per interval, as the traffic route bounds it."""
    return {i: int(getattr(settings, INTERVAL_DAYS_MAX[i])) for i in INTERVALS}


def router(deps: Deps, sites: SiteRegistry | None = None) -> APIRouter:
    """The route; days and ranges follow each site's zone in ``sites`` (UTC for a site
    not registered, and for every site without a registry)."""
    api = APIRouter(tags=["plausible"])
    needs, metrics = deps.needs, deps.metrics
    days_max = days_max_of(deps.settings)

    @api.post(
        "/api/v2/query",
        summary="Plausible Stats API v2 query",
        description="Plausible's query body and answer; see README.md for what is supported.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": REQUEST_SCHEMA}},
            }
        },
        responses={
            **AUTH_RESPONSES,
            200: {"content": {"application/json": {"schema": ANSWER_SCHEMA}}},
            400: {"model": Problem, "description": "A query this API refuses, and why"},
            413: {"model": Problem, "description": f"A body over {BODY_BYTES_MAX} bytes"},
            **unavailable_response("No insight engine, or the query took too long"),
        },
    )
    async def plausible_query(
        request: Request, grant: Grant | None = Depends(needs["read"])
    ) -> Response:
        raw = await _body(request)
        if raw is None:
            return error(413, f"The request body is over {BODY_BYTES_MAX} bytes.")
        try:
            body = orjson.loads(raw)
            site = plausible.site_of(body)
        except orjson.JSONDecodeError:
            return error(400, "The request body is not JSON.")
        except plausible.PlausibleError as exc:
            return error(400, str(exc))
        # Checked on the normalized name before the query is even read, as the
        # traffic route does: a read token never learns about another site.
        decision = allow_sites(grant, [site])
        if not decision.ok:
            metrics.denied.labels("403").inc()
            return denied(decision)
        return await _answer(deps, sites, days_max, body)

    return api


async def _answer(
    deps: Deps, sites: SiteRegistry | None, days_max: dict[str, int], body: Any
) -> Response:
    """Plan the query, run it under the query timeout, and answer (or say why not)."""
    insights, timeout_s = deps.insights, deps.settings.query_timeout_s
    if insights is None:
        return _unavailable("insight queries are not available on this cluster")
    try:
        zones = None
        if sites is not None:
            # Fresh zones (re-read at most every sites_reload_s): they cut the days.
            await sites.snapshot()
            zones = sites.timezone_of
        plan = plausible.translate(
            body, now_ms=int(deps.clock() * 1000), days_max=days_max, site_timezone=zones
        )
        answer, follow_up = await asyncio.wait_for(_run(insights, plan), timeout_s)
    except (plausible.PlausibleError, InsightError) as exc:
        return error(400, str(exc))
    except TimeoutError:
        return _unavailable(f"query took longer than {timeout_s} s")
    except Unavailable as exc:
        return _unavailable(str(exc), exc.retry_after_s)
    except SitesUnavailable as exc:
        return _unavailable(str(exc))
    return Response(
        orjson.dumps(plausible.render(plan, answer, follow_up)), media_type="application/json"
    )


async def _run(
    insights: Insights, plan: plausible.Plan
) -> tuple[InsightAnswer, InsightAnswer | None]:
    """The plan's query, then the one counting the rows past its page, if needed."""
    answer = await insights.run(plan.query)
    more = plan.follow_up(answer)
    return answer, (await insights.run(more) if more is not None else None)


async def _body(request: Request) -> bytes | None:
    """The body, read no further than BODY_BYTES_MAX (None past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > BODY_BYTES_MAX:
        return None
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > BODY_BYTES_MAX:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _unavailable(message: str, retry_after_s: int = 1) -> JSONResponse:
    return JSONResponse(
        {"error": message}, status_code=503, headers={"Retry-After": str(retry_after_s)}
    )
