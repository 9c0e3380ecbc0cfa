"""The web tracker's endpoint: ``POST /api/event``, Plausible's Events API.

A page's script (Plausible's own tracker, unchanged) sends one event per request from
any origin, without a token, so the route answers CORS for every origin and guards
itself otherwise: only registered sites (flowray.warehouse.sites), a rate limit per
client address and per site, a small body, and bots dropped. The body is read by the
pure flowray.ingest.plausible; the events it makes go through the same handler as
``POST /v1/events``, so ``202 ok`` means a majority of each group has them on disk.

The client's address is the TCP peer's, unless the peer is one of
``settings.trusted_proxies``: then it is the right-most ``X-Forwarded-For`` address
that is not itself a trusted proxy (addresses further left are whatever the client
wrote). It is used for the visitor id and the rate limit, and then forgotten: no event,
log line or bucket key holds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any, TypeAlias

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from flowray.api.auth import TokenBucket
from flowray.api.common import RETRY_AFTER, Problem, error, unavailable_response
from flowray.api.ingest import IngestHandler, read_asgi_body
from flowray.config import Settings
from flowray.ingest import events as ev
from flowray.ingest import plausible
from flowray.ingest.visitors_id import day_of_ms
from flowray.storage.salts import SaltError, SaltStore
from flowray.warehouse.sites import SiteRegistry, SitesUnavailable

log = logging.getLogger(__name__)

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

CORS_HEADERS = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "86400",
}
# Plausible's header for events it answered 202 and did not store (bots, say).
DROPPED_HEADER = "X-Plausible-Dropped"
BUCKETS_MAX = 100_000  # per kind (addresses, sites): about 20 MB at most
FORWARDED_HOPS_MAX = 32  # X-Forwarded-For entries looked at, right to left
SALT_TIMEOUT_S = 2.0  # the salts live on shared storage; a first read may fsync
IPV6_PREFIX = 64  # one IPv6 client usually holds a whole /64


# --------------------------------------------------------------------------- addresses


def trusted_networks(text: str) -> tuple[Network, ...]:
    """``settings.trusted_proxies`` (comma-separated addresses and CIDR networks)."""
    networks = []
    for item in text.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {item.strip()!r} is no address or network"
                ) from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    """An address as a proxy writes it: bare, or with a port ("1.2.3.4:80", "[::1]:80")."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> Address | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the
    right-most X-Forwarded-For entry that is not a trusted proxy. An entry that is no
    address stops the walk at the proxy that wrote it; None when the peer is unknown."""
    address = _address(peer) if peer else None
    if address is None or not _is_trusted(address, trusted):
        return address
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops[-FORWARDED_HOPS_MAX:]):
        found = _address(hop)
        if found is None:
            return address
        address = found
        if not _is_trusted(address, trusted):
            return address
    return address


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)


# --------------------------------------------------------------------------- rate limits


class RateLimiter:
    """Token buckets by key, at most ``max_keys`` of them.

    A bucket that has refilled is the same as no bucket, so the least recently used
    ones are dropped when they are full, and when the table is full whatever the
    state (a flood of new keys then resets the oldest ones: the price of the bound).
    Time comes in as ``now_s``, so tests drive it.
    """

    def __init__(self, rate_per_s: float, max_keys: int = BUCKETS_MAX) -> None:
        self.rate_per_s = rate_per_s
        self.max_keys = max_keys
        self._buckets: OrderedDict[bytes | str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: bytes | str, now_s: float) -> float:
        """Spend a unit of ``key``'s bucket: 0, or the seconds until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None:
            self._evict(now_s)
            bucket = self._buckets[key] = TokenBucket.full(self.rate_per_s, now_s)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now_s)

    def _evict(self, now_s: float) -> None:
        refill_s = TokenBucket.capacity_of(self.rate_per_s) / self.rate_per_s
        for _ in range(2):  # a little each time keeps idle buckets from piling up
            oldest = next(iter(self._buckets.values()), None)
            if oldest is None or now_s - oldest.updated_s < refill_s:
                break
            self._buckets.popitem(last=False)
        while len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)


def address_key(address: Address | None, key: bytes) -> bytes:
    """What a client's bucket is filed under: a keyed hash of its address (of its /64
    for IPv6), so the table holds no address; ``key`` lives in this process only."""
    if address is None:
        return b"unknown"
    if isinstance(address, ipaddress.IPv6Address):
        packed = ipaddress.ip_network(f"{address}/{IPV6_PREFIX}", strict=False).network_address
        address = packed
    return hashlib.blake2b(address.packed, key=key, digest_size=16).digest()


# --------------------------------------------------------------------------- the route


def answer(status: int, message: str, **headers: str) -> JSONResponse:
    response = error(status, message)
    response.headers.update({**CORS_HEADERS, **headers})
    return response


def too_many(message: str, wait_s: float) -> JSONResponse:
    return answer(429, message, **{"Retry-After": str(max(1, math.ceil(wait_s)))})


def accepted(dropped: int = 0) -> PlainTextResponse:
    """Plausible's answer: 202 ``ok``, also for events it chose not to store."""
    headers = {**CORS_HEADERS, **({DROPPED_HEADER: str(dropped)} if dropped else {})}
    return PlainTextResponse("ok", status_code=202, headers=headers)


class Tracker:
    """What ``POST /api/event`` does, step by step (see :meth:`accept`)."""

    def __init__(
        self,
        handler: IngestHandler,
        registry: SiteRegistry,
        salts: SaltStore,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        settings: Settings = handler.settings
        self.handler, self.registry, self.salts = handler, registry, salts
        self.clock = handler.deps.clock
        self.monotonic = monotonic
        self.trusted = trusted_networks(settings.trusted_proxies)
        self.per_address = RateLimiter(settings.event_rate_per_ip)
        self.per_site = RateLimiter(settings.event_rate_per_site)
        self._address_key = secrets.token_bytes(32)
        self._salt: tuple[date, bytes] | None = None
        self._salt_lock = asyncio.Lock()

    async def accept(self, request: Request) -> Response:
        """Limit the client, read and check the body, drop what is not counted, limit
        the sites, then commit the events as ``POST /v1/events`` does."""
        started = time.perf_counter()
        address = client_address(
            request.client.host if request.client else None,
            request.headers.getlist("x-forwarded-for"),
            self.trusted,
        )
        wait_s = self.per_address.take(address_key(address, self._address_key), self.monotonic())
        if wait_s > 0:
            return too_many("too many events from this address", wait_s)
        body = await read_asgi_body(request.headers, request.receive, plausible.BODY_BYTES_MAX)
        if isinstance(body, JSONResponse):
            body.headers.update(CORS_HEADERS)
            return body
        try:
            hit = plausible.parse_body(body)
        except plausible.PayloadError as exc:
            return answer(exc.status, str(exc))
        refused = await self._refuse_sites(hit)
        if refused is not None:
            return refused
        ua = request.headers.get("user-agent")
        if not hit.counted or ua is None or plausible.is_bot(ua):
            return accepted(dropped=len(hit.sites))
        for site in hit.sites:
            wait_s = self.per_site.take(site, self.monotonic())
            if wait_s > 0:
                return too_many(f"too many events for site {site}", wait_s)
        return await self._commit(hit, ua, address, started)

    async def _refuse_sites(self, hit: plausible.Hit) -> Response | None:
        try:
            snapshot = await self.registry.snapshot()
        except SitesUnavailable as exc:
            return answer(503, str(exc), **{"Retry-After": "1"})
        unknown = snapshot.unknown(hit.sites)
        if unknown:
            return answer(
                400,
                f"site {', '.join(unknown)} is not registered "
                "(an admin registers it: flowray sites add DOMAIN)",
            )
        return None

    async def _commit(self, hit: plausible.Hit, ua: str, address: Any, started: float) -> Response:
        ts_ms = int(self.clock() * 1000)
        try:
            salt = await self._salt_of(day_of_ms(ts_ms))
        except (SaltError, OSError, TimeoutError) as exc:
            log.warning("no visitor-id salt: %s", exc or "timed out")
            return answer(503, "visitor ids cannot be made now", **{"Retry-After": "1"})
        rows = plausible.events(
            hit, ts_ms=ts_ms, ua=ua, ip=None if address is None else str(address), salt=salt
        )
        response = await self.handler.accept_body(
            orjson.dumps(rows), ev.parse_json_events, None, started
        )
        if response.status_code == 200:
            return accepted()
        if response.status_code == 422:  # a rule of the event schema this module missed
            detail = orjson.loads(bytes(response.body)).get("error", "event rejected")
            return answer(400, str(detail))
        response.headers.update(CORS_HEADERS)
        return response

    async def _salt_of(self, day: date) -> bytes:
        """The salt of ``day``, read on a worker thread once a day (the store is files
        on shared storage, and a day's first read may write and fsync one)."""
        kept = self._salt
        if kept is not None and kept[0] == day:
            return kept[1]
        async with self._salt_lock:
            if self._salt is None or self._salt[0] != day:
                salt = await asyncio.wait_for(
                    asyncio.to_thread(self.salts.salt_for, day), SALT_TIMEOUT_S
                )
                self._salt = (day, salt)
            return self._salt[1]


# --------------------------------------------------------------------------- OpenAPI

_TEXT_OR_NULL = {"anyOf": [{"type": "string"}, {"type": "null"}]}


def _field(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "description": description}


def event_body() -> dict[str, Any]:
    """The request body, written out: the route reads it raw (the tracker sends it as
    text/plain, which this document leaves out so that client generators keep the
    operation; the body is the same JSON either way)."""
    props = {
        "anyOf": [
            {
                "type": "object",
                "maxProperties": plausible.PROPS_MAX,
                "additionalProperties": {
                    "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]
                },
            },
            {"type": "string"},
            {"type": "null"},
        ]
    }
    name = {
        "anyOf": [{"type": "string", "maxLength": plausible.NAME_CHARS_MAX}, {"type": "integer"}]
    }
    url = {"type": "string", "maxLength": plausible.URL_CHARS_MAX}
    fields = {
        "name": _field("The event: pageview, or a custom event's name (also n)", name),
        "url": _field("The page's URL, http or https (also u)", url),
        "domain": _field("The site, or sites separated by commas (also d)", {"type": "string"}),
        "referrer": _field("The referring page (also r)", _TEXT_OR_NULL),
        "props": _field("Custom properties: strings, numbers, booleans (also p)", props),
        "interactive": _field("Ignored (also i)", {"type": "boolean"}),
    }
    schema = {
        "type": "object",
        "title": "PlausibleEvent",
        "description": "One event, as Plausible's Events API takes it: name, url and domain "
        f"are required, under their long or short keys. At most {plausible.BODY_BYTES_MAX} "
        "bytes; other keys are ignored.",
        "properties": fields,
        "additionalProperties": True,
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "Committed by a majority (or dropped: a bot, a follow-up event; then "
        f"{DROPPED_HEADER} says how many)",
        "content": {"text/plain": {"schema": {"type": "string"}, "example": "ok"}},
    },
    400: {"model": Problem, "description": "A bad body, or a site that is not registered"},
    413: {"model": Problem, "description": f"Body over {plausible.BODY_BYTES_MAX} bytes"},
    429: {
        "model": Problem,
        "description": "Too many events from this address or for this site",
        "headers": RETRY_AFTER,
    },
    **unavailable_response("No quorum, or the sites or salts cannot be read; retry"),
}


def router(
    handler: IngestHandler,
    registry: SiteRegistry,
    salts: SaltStore | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> APIRouter:
    """``POST /api/event`` and its CORS preflight. ``salts``: the warehouse's
    (WAREHOUSE/salts, shared by every front) unless given."""
    settings = handler.settings
    store = salts or SaltStore(
        settings.warehouse_dir / "salts", lambda: int(handler.deps.clock() * 1000)
    )
    tracker = Tracker(handler, registry, store, monotonic)
    api = APIRouter(tags=["tracker"])

    @api.post(
        "/api/event",
        summary="Record a page view or custom event (Plausible's Events API)",
        status_code=202,
        response_class=PlainTextResponse,
        responses=RESPONSES,
        openapi_extra=event_body(),
    )
    async def event(request: Request) -> Response:
        return await tracker.accept(request)

    @api.options("/api/event", include_in_schema=False)
    async def event_preflight() -> Response:
        return Response(status_code=204, headers=PREFLIGHT_HEADERS)

    return api
