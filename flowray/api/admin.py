"""The admin routes: cluster status, processing now, re-processing and rollback jobs,
rolling restarts, shard moves and warehouse versions (all behind the admin scope)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from flowray.api.common import AUTH_RESPONSES, Deps, Unavailable, error, unavailable
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


# Long: a list of small route declarations, one per admin action.
def router(deps: Deps) -> APIRouter:
    api = APIRouter()
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
        responses=AUTH_RESPONSES,
        dependencies=[Depends(needs["admin"])],
    )
    async def process(
        mode: str = Query("closed", description="due, closed (hour over) or all (open too)"),
    ) -> Response:
        if mode not in ("due", "closed", "all"):
            return error(422, "mode must be one of due, closed, all")
        try:
            return JSONResponse(await admin.process(mode))
        except Unavailable as exc:
            return unavailable(exc)

    @api.post(
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
            return error(422, str(exc))

    @api.post(
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
            return error(422, str(exc))

    @api.post(
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
            return error(409, str(exc))

    @api.post(
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
            return error(422, str(exc))
        except Unavailable as exc:
            return unavailable(exc)

    @api.get(
        "/v1/admin/jobs/{job_id}",
        summary="Progress and result of a re-processing or rollback job",
        responses={**AUTH_RESPONSES, 404: {"description": "No such job"}},
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
        responses=AUTH_RESPONSES,
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
