"""The flowray HTTP API, built by a factory that takes its dependencies.

The factory does no I/O of its own: the ingest path, the warehouse, the admin calls,
the cache and the authorizer come in as arguments, so tests drive the app in-process
through ``httpx.ASGITransport`` with fakes or the real things, and the Ray Serve
deployment passes handles to the cluster's actors. It only assembles the routers of
each area (ingest, queries, admin, metrics, dashboard), which are built from the same
:class:`~flowray.api.common.Deps`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from flowray.api import admin as admin_routes
from flowray.api import dashboard as dashboard_routes
from flowray.api import ingest as ingest_routes
from flowray.api import insights as insight_routes
from flowray.api import metrics as metrics_routes
from flowray.api import plausible as plausible_routes
from flowray.api import queries as query_routes
from flowray.api import sites as site_routes
from flowray.api import tracker as tracker_routes
from flowray.api.auth import Authorizer
from flowray.api.common import (
    CHOICES,
    Admin,
    Denied,
    Deps,
    Ingest,
    Insights,
    Live,
    Minutes,
    Unavailable,
    auth_dependencies,
    choice_error,
    denied,
    error,
)
from flowray.api.ingest import WARM_EVENTS, IngestFastPath, IngestHandler
from flowray.config import Settings
from flowray.core.router import ShardMap
from flowray.query.cache import Cache
from flowray.warehouse.sites import SiteRegistry

__all__ = ["WARM_EVENTS", "IngestFastPath", "Unavailable", "create_app"]


# Long: it only assembles the routers, one or two lines per area of the API.
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
    insights: Insights | None = None,
    sites: SiteRegistry | None = None,
) -> FastAPI:
    """The API; ``authorizer=None`` serves every route without tokens; ``sites=None``:
    the registry of sites in the settings' warehouse directory (read when first used)."""
    # A fixed map, or one that follows shard moves (LiveShardMap).
    current_map: Callable[[], ShardMap] = (
        shard_map if callable(shard_map) else (lambda: shard_map)  # type: ignore[return-value]
    )
    app = FastAPI(
        title="flowray",
        version="0.1.0",
        description="Minute-by-minute web traffic: ingest page views, query per-site series.",
        # The handler's name: what a generated client calls the operation.
        generate_unique_id_function=operation_id,
    )
    deps = Deps(
        settings=settings,
        current_map=current_map,
        ingest=ingest,
        warehouse=warehouse,
        admin=admin,
        cache=cache,
        clock=clock,
        authorizer=authorizer,
        live=live,
        metrics=metrics_routes.Metrics(),
        needs=auth_dependencies(authorizer),
        insights=insights,
    )
    app.state.metrics = deps.metrics
    app.state.ingest = ingest  # the gateway warms it (RayIngest.warm)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_answer(exc.errors())

    @app.exception_handler(Denied)
    async def refused(_request: Request, exc: Denied) -> JSONResponse:
        deps.metrics.denied.labels(str(exc.decision.status)).inc()
        return denied(exc.decision)

    handler = IngestHandler(deps)
    app.state.warm = handler.warm
    app.state.ingest_asgi = handler.ingest_asgi  # IngestFastPath's way in
    app.include_router(ingest_routes.router(handler))
    app.include_router(query_routes.router(deps))
    app.include_router(insight_routes.router(deps))
    app.include_router(
        # Looked up per scrape: the app is also built without admin calls, for its document.
        metrics_routes.router(
            deps.metrics, lambda: admin.status(), cache.name, settings.rpc_timeout_s
        )
    )
    app.include_router(dashboard_routes.router())
    app.include_router(admin_routes.router(deps))
    registry = sites or SiteRegistry.in_warehouse(settings.warehouse_dir, settings.sites_reload_s)
    app.include_router(tracker_routes.router(handler, registry))
    app.include_router(site_routes.router(deps, registry))
    app.include_router(plausible_routes.router(deps, registry))
    with_schemas(app, ingest_routes.components())
    return app


def operation_id(route: APIRoute) -> str:
    return route.name


def with_schemas(app: FastAPI, schemas: dict[str, Any]) -> None:
    """Add ``schemas`` to the document's components: the raw-body ingest routes refer
    to them from their openapi_extra, which FastAPI does not look into."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            document.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def invalid_answer(errors: Sequence[Any]) -> JSONResponse:
    """422 for a request that does not match the document. A value outside a parameter's
    choices alone is answered as the routes did before their parameters were typed
    (``{"error": "interval must be one of minute, hour, day"}``); anything else names
    every field that does not match."""
    choices = [e for e in errors if _choice_name(e) is not None]
    if choices and len(choices) == len(errors):
        return error(422, choice_error(str(_choice_name(choices[0]))))
    details = [
        {"field": ".".join(str(p) for p in e.get("loc", ())), "reason": e.get("msg", "")}
        for e in errors
    ]
    return error(422, "invalid request", details=details)


def _choice_name(problem: Any) -> str | None:
    """The parameter's name when ``problem`` is a query value outside its choices."""
    loc = tuple(problem.get("loc", ()))
    if problem.get("type") == "enum" and len(loc) == 2 and loc[0] == "query" and loc[1] in CHOICES:
        return str(loc[1])
    return None
