"""What the API's routers share: the dependencies they are built from, the errors they
answer with (and their OpenAPI description), the parameters with fixed choices, and the
auth dependency per kind of route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
from fastapi import Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from flowray.api.auth import Authorizer, Decision, Grant
from flowray.api.metrics import Metrics
from flowray.config import Settings
from flowray.core.router import ShardMap
from flowray.ingest.pieces import GroupEvents
from flowray.query.cache import Cache
from flowray.query.insights import InsightAnswer, InsightQuery

# --------------------------------------------------------------------------- choices

# Typed, so OpenAPI lists the choices and a generated client gets an enum; a value
# outside them is answered by create_app's validation handler with choice_error, the
# wording the routes used when they checked these strings themselves.


class Interval(StrEnum):
    """The bucket of a traffic series."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class SeriesFormat(StrEnum):
    """How a traffic series is written."""

    JSON = "json"
    CSV = "csv"


class ProcessMode(StrEnum):
    """Which blocks to seal and process now: those due, those whose hour is over
    (closed), or every block, open ones too (all)."""

    DUE = "due"
    CLOSED = "closed"
    ALL = "all"


# The query parameters with fixed choices, by name (each name has one meaning across
# the routes).
CHOICES: dict[str, type[StrEnum]] = {
    "interval": Interval,
    "format": SeriesFormat,
    "mode": ProcessMode,
}


def choice_error(name: str) -> str:
    """``interval must be one of minute, hour, day``; ``format must be json or csv``."""
    values = [choice.value for choice in CHOICES[name]]
    if len(values) == 2:
        return f"{name} must be {values[0]} or {values[1]}"
    return f"{name} must be one of {', '.join(values)}"


# --------------------------------------------------------------------------- error answers


class Problem(BaseModel):
    """Every error answer: what went wrong, and for some errors the particulars."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="What went wrong, for a person to read")


class FieldProblem(BaseModel):
    field: str = Field(description="Where: query.start, body.sites, ...")
    reason: str


class Invalid(Problem):
    """A request the route refuses: its own reason, or 'invalid request' with each
    parameter or body field that does not match this document."""

    details: list[FieldProblem] = Field(
        default=[], description="Each field that does not match (only for 'invalid request')"
    )


class Forbidden(Problem):
    forbidden_sites: list[str] = Field(
        default=[], description="The sites the token does not cover, when that is why"
    )


RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "model": Problem,
        "description": "No token, or an unknown or revoked one (when auth is enforced)",
    },
    403: {
        "model": Forbidden,
        "description": "The token's scope or sites do not cover this request",
    },
    429: {
        "model": Problem,
        "description": "The token's rate limit; retry after Retry-After",
        "headers": RETRY_AFTER,
    },
}


def unavailable_response(description: str) -> dict[int | str, dict[str, Any]]:
    """The 503 a route answers when the cluster cannot now, with its Retry-After."""
    return {503: {"model": Problem, "description": description, "headers": RETRY_AFTER}}


def invalid_response(description: str) -> dict[int | str, dict[str, Any]]:
    """The route's 422 (it replaces FastAPI's, whose shape create_app's handler changes)."""
    return {422: {"model": Invalid, "description": description}}


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


class Insights(Protocol):
    async def run(self, query: InsightQuery) -> InsightAnswer:
        """Answer an insight query from the warehouse and the live facts; raises
        InsightError for a query that cannot be answered, Unavailable when too slow."""


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


GrantDependency = Callable[..., Awaitable[Grant | None]]


@dataclass
class Deps:
    """Everything the routers are built from: the app factory's arguments, the current
    shard map, the metrics and one auth dependency per kind of route."""

    settings: Settings
    current_map: Callable[[], ShardMap]
    ingest: Ingest
    warehouse: Minutes
    admin: Admin
    cache: Cache
    clock: Callable[[], float]
    authorizer: Authorizer | None
    live: Live | None
    metrics: Metrics
    needs: dict[str, GrantDependency]
    insights: Insights | None = None


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def denied(decision: Decision) -> JSONResponse:
    return JSONResponse(decision.body(), status_code=decision.status, headers=decision.headers())


def unavailable(exc: Unavailable) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)}
    )


def auth_dependencies(authorizer: Authorizer | None) -> dict[str, GrantDependency]:
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
