"""The admin routes: cluster status, processing now, re-processing and rollback jobs,
rolling restarts, shard moves and warehouse versions (all behind the admin scope)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from flowray.api.common import (
    AUTH_RESPONSES,
    Deps,
    Problem,
    ProcessMode,
    Unavailable,
    error,
    invalid_response,
    unavailable,
    unavailable_response,
)
from flowray.core.router import SiteError, normalize_site
from flowray.query import series


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


class Job(BaseModel):
    """A background job (re-processing, rollback, rolling restart) and its progress."""

    model_config = ConfigDict(extra="allow")
    job: str = Field(description="Its id, for GET /v1/admin/jobs/{job_id}")
    kind: str = Field(description="reprocess, rollback or restart")
    state: str = Field(description="running, done or failed")
    done: int | None = Field(None, description="Steps done so far")
    total: int | None = Field(None, description="Steps in all, once known")
    params: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class Version(BaseModel):
    """A warehouse version: a complete set of units made by one processing logic."""

    model_config = ConfigDict(extra="allow")
    version: int
    logic: str
    current: bool = Field(description="Whether queries read this version")
    parent: int | None = None
    modules: list[str] = []
    units: int | None = None
    events: int | None = None


class ShardMoved(BaseModel):
    model_config = ConfigDict(extra="allow")
    shard: int
    from_group: int
    to_group: int
    owners: list[int] | None = Field(None, description="Each shard's group from now on")


class Unparsed(BaseModel):
    """FastAPI's own answer to a body it cannot decode, in its shape, not the app's."""

    detail: str


UNAVAILABLE = unavailable_response("The processor did not answer; retry after Retry-After")


# Long: a list of small route declarations, one per admin action.
def router(deps: Deps) -> APIRouter:
    api = APIRouter(tags=["admin"])
    admin, cache, needs = deps.admin, deps.cache, deps.needs

    @api.get(
        "/v1/admin/status",
        summary="Groups, replicas, blocks and warehouse versions",
        responses=AUTH_RESPONSES,
        dependencies=[Depends(needs["admin"])],
    )
    async def status() -> dict[str, Any]:
        out = await admin.status()
        out["cache"] = cache.name
        return out

    @api.post(
        "/v1/admin/process",
        summary="Seal and process due blocks now",
        response_model=dict[str, Any],
        responses={
            **AUTH_RESPONSES,
            **invalid_response("An unknown mode"),
            **unavailable_response("Processing did not finish in time; retry after Retry-After"),
        },
        dependencies=[Depends(needs["admin"])],
    )
    async def process(
        mode: ProcessMode = Query(
            ProcessMode.CLOSED, description="due, closed (hour over) or all (open too)"
        ),
    ) -> Response:
        try:
            return JSONResponse(await admin.process(mode.value))
        except Unavailable as exc:
            return unavailable(exc)

    @api.post(
        "/v1/admin/reprocess",
        summary="Start re-processing a time range (optionally some sites, another logic)",
        status_code=202,
        response_model=Job,
        responses={
            **AUTH_RESPONSES,
            400: {"model": Unparsed, "description": "A body that is not JSON"},
            **invalid_response("A bad range, site, logic or module"),
            **UNAVAILABLE,
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
            return error(422, str(exc))

    @api.post(
        "/v1/admin/rollback",
        summary="Start returning to the previous warehouse version (or a given one)",
        status_code=202,
        response_model=Job,
        responses={**AUTH_RESPONSES, **invalid_response("Nothing to return to"), **UNAVAILABLE},
        dependencies=[Depends(needs["admin"])],
    )
    async def rollback(
        to: int | None = Query(None, description="Version to return to (default: the previous)"),
    ) -> Response:
        try:
            return await _job_started(admin.rollback(to))
        except ValueError as exc:
            return error(422, str(exc))

    @api.post(
        "/v1/admin/restart",
        summary="Start a rolling restart of every process of the cluster",
        status_code=202,
        response_model=Job,
        responses={
            **AUTH_RESPONSES,
            409: {"model": Problem, "description": "A rolling restart is running"},
            **unavailable_response("The restarter is not running or did not answer"),
        },
        dependencies=[Depends(needs["admin"])],
    )
    async def restart() -> Response:
        try:
            return await _job_started(admin.restart())
        except ValueError as exc:
            return error(409, str(exc))

    @api.post(
        "/v1/admin/shards/{shard}/move",
        summary="Send a shard's new writes to another group (scaling out)",
        response_model=ShardMoved,
        responses={**AUTH_RESPONSES, **invalid_response("No such shard or group"), **UNAVAILABLE},
        dependencies=[Depends(needs["admin"])],
    )
    async def move_shard(
        shard: int = Path(ge=0, le=1_000_000),
        to: int = Query(ge=0, le=1_000_000, description="The group to move the shard to"),
    ) -> Response:
        try:
            return JSONResponse(await admin.move_shard(shard, to))
        except ValueError as exc:
            return error(422, str(exc))
        except Unavailable as exc:
            return unavailable(exc)

    @api.get(
        "/v1/admin/jobs/{job_id}",
        summary="Progress and result of a re-processing or rollback job",
        response_model=Job,
        responses={
            **AUTH_RESPONSES,
            404: {"model": Problem, "description": "No such job"},
            **invalid_response("A job id longer than 64 characters"),
            **UNAVAILABLE,
        },
        dependencies=[Depends(needs["admin"])],
    )
    async def job(job_id: str = Path(max_length=64)) -> Response:
        try:
            state = await admin.job(job_id)
        except Unavailable as exc:
            return unavailable(exc)
        if state is None:
            return error(404, f"no job {job_id} (jobs are forgotten when the processor restarts)")
        return JSONResponse(state)

    @api.get(
        "/v1/admin/versions",
        summary="Warehouse versions: logic, parent, units, events, which is current",
        response_model=list[Version],
        responses={**AUTH_RESPONSES, **UNAVAILABLE},
        dependencies=[Depends(needs["admin"])],
    )
    async def versions() -> Response:
        try:
            return JSONResponse(await admin.versions())
        except Unavailable as exc:
            return unavailable(exc)

    return api


async def _job_started(call: Awaitable[dict[str, Any]]) -> Response:
    try:
        return JSONResponse(await call, status_code=202)
    except Unavailable as exc:
        return unavailable(exc)
