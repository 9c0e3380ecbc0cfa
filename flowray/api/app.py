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
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from flowray.api import admin as admin_routes
from flowray.api import dashboard as dashboard_routes
from flowray.api import ingest as ingest_routes
from flowray.api import metrics as metrics_routes
from flowray.api import queries as query_routes
from flowray.api.auth import Authorizer
from flowray.api.common import (
    Admin,
    Denied,
    Deps,
    Ingest,
    Live,
    Minutes,
    Unavailable,
    auth_dependencies,
    denied,
    error,
)
from flowray.api.ingest import WARM_EVENTS, IngestFastPath, IngestHandler
from flowray.config import Settings
from flowray.core.router import ShardMap
from flowray.query.cache import Cache

__all__ = ["WARM_EVENTS", "IngestFastPath", "Unavailable", "create_app"]


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
    )
    app.state.metrics = deps.metrics
    app.state.ingest = ingest  # the gateway warms it (RayIngest.warm)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "reason": e.get("msg", "")}
            for e in exc.errors()
        ]
        return error(422, "invalid request", details=details)

    @app.exception_handler(Denied)
    async def refused(_request: Request, exc: Denied) -> JSONResponse:
        deps.metrics.denied.labels(str(exc.decision.status)).inc()
        return denied(exc.decision)

    handler = IngestHandler(deps)
    app.state.warm = handler.warm
    app.state.ingest_asgi = handler.ingest_asgi  # IngestFastPath's way in
    app.include_router(ingest_routes.router(handler))
    app.include_router(query_routes.router(deps))
    app.include_router(
        metrics_routes.router(deps.metrics, admin.status, cache.name, settings.rpc_timeout_s)
    )
    app.include_router(dashboard_routes.router())
    app.include_router(admin_routes.router(deps))
    return app
