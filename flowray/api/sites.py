"""The registry's admin routes: list, register and unregister the sites that
``POST /api/event`` takes events for (flowray.warehouse.sites), behind the admin scope.

The store is SQLite on shared storage, so each call runs on a worker thread with a
timeout rather than on the event loop; the front's own snapshot takes the change at
once, the other fronts within ``sites_reload_s``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from flowray.api.admin import Unparsed
from flowray.api.common import (
    AUTH_RESPONSES,
    Deps,
    Problem,
    error,
    invalid_response,
    unavailable_response,
)
from flowray.core.router import SITE_BYTES_MAX
from flowray.warehouse.sites import (
    DEFAULT_TIMEZONE,
    SiteExists,
    SiteRegistry,
    SiteStore,
    SitesUnavailable,
)

STORE_CALL_TIMEOUT_S = 5.0  # a write waits out SQLite's busy timeout at most, then fails
UNAVAILABLE = unavailable_response("The site registry cannot be read or written now; retry")
T = TypeVar("T")


class SiteIn(BaseModel):
    """A site to register."""

    model_config = ConfigDict(extra="forbid")
    domain: str = Field(
        max_length=4 * SITE_BYTES_MAX,
        description="The site's host name, e.g. example.com (normalized as events' sites are)",
    )
    timezone: str = Field(
        DEFAULT_TIMEZONE, max_length=64, description="IANA time zone of its reports"
    )


class SiteOut(BaseModel):
    domain: str
    timezone: str
    added_ms: int = Field(description="When it was registered, epoch ms")


async def _call(call: Callable[..., T], *args: Any) -> T:
    return await asyncio.wait_for(asyncio.to_thread(call, *args), STORE_CALL_TIMEOUT_S)


def _unavailable(exc: Exception) -> JSONResponse:
    message = str(exc) or "the site registry did not answer in time"
    return JSONResponse({"error": message}, status_code=503, headers={"Retry-After": "1"})


# Long: three route declarations (their parameters are their OpenAPI) and their
# handlers, each a store call and its answers.
def router(deps: Deps, registry: SiteRegistry) -> APIRouter:
    api = APIRouter(tags=["sites"])
    store: SiteStore = registry.store
    guard = [Depends(deps.needs["admin"])]

    @api.get(
        "/v1/sites",
        summary="The registered sites (those POST /api/event takes events for)",
        response_model=list[SiteOut],
        responses={**AUTH_RESPONSES, **UNAVAILABLE},
        dependencies=guard,
    )
    async def list_sites() -> Response:
        try:
            sites = await _call(store.sites)
        except (SitesUnavailable, TimeoutError) as exc:
            return _unavailable(exc)
        return JSONResponse([s.public() for s in sites])

    @api.post(
        "/v1/sites",
        summary="Register a site (again with the same zone: no change, 200)",
        status_code=201,
        response_model=SiteOut,
        responses={
            **AUTH_RESPONSES,
            200: {"model": SiteOut, "description": "Registered already, in this zone"},
            400: {"model": Unparsed, "description": "A body that is not JSON"},
            409: {"model": Problem, "description": "Registered already, in another zone"},
            **invalid_response("A bad domain or time zone"),
            **UNAVAILABLE,
        },
        dependencies=guard,
    )
    async def add_site(body: SiteIn) -> Response:
        try:
            site, new = await _call(store.add, body.domain, body.timezone)
        except SiteExists as exc:
            return error(409, str(exc))
        except ValueError as exc:
            return error(422, str(exc))
        except (SitesUnavailable, TimeoutError) as exc:
            return _unavailable(exc)
        registry.changed(added=site)
        return JSONResponse(site.public(), status_code=201 if new else 200)

    @api.delete(
        "/v1/sites/{domain}",
        summary="Unregister a site: its events are refused from now on, stored ones stay",
        response_model=SiteOut,
        responses={
            **AUTH_RESPONSES,
            404: {"model": Problem, "description": "Not registered"},
            **invalid_response("A bad domain"),
            **UNAVAILABLE,
        },
        dependencies=guard,
    )
    async def remove_site(domain: str = Path(max_length=4 * SITE_BYTES_MAX)) -> Response:
        try:
            site = await _call(store.remove, domain)
        except ValueError as exc:
            return error(422, str(exc))
        except (SitesUnavailable, TimeoutError) as exc:
            return _unavailable(exc)
        if site is None:
            return error(404, f"site {domain} is not registered")
        registry.changed(removed=site.domain)
        return JSONResponse(site.public())

    return api
