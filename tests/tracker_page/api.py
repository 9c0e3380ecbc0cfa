"""What the tracker tests ask of flowray's HTTP API: which routes it has, registering a
site, sending an event as the Plausible tracker does, and reading the counts back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import orjson

T = TypeVar("T")

TRACKER_ROUTES = ("/api/event", "/v1/sites")
INSIGHT_ROUTES = (
    "/v1/sites/{site}/timeseries",
    "/v1/sites/{site}/totals",
    "/v1/sites/{site}/breakdown",
)
# An ordinary desktop browser: flowray counts HTTP libraries and headless browsers as
# bots, not visitors.
BROWSER_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)


def missing_routes(client: httpx.Client, routes: tuple[str, ...]) -> list[str]:
    """Those of ``routes`` the running app does not serve (read from its OpenAPI)."""
    answer = client.get("/openapi.json")
    answer.raise_for_status()
    paths = answer.json()["paths"]
    return [route for route in routes if route not in paths]


def require_routes(client: httpx.Client, routes: tuple[str, ...]) -> None:
    """Fail at once, naming them, when the app lacks routes a test relies on (rather
    than at the first call, with a bare 404)."""
    missing = missing_routes(client, routes)
    assert not missing, f"the app serves no {', '.join(missing)}"


def register_site(client: httpx.Client, site: str, timezone: str = "UTC") -> None:
    """Register ``site`` through the admin route (as ``flowray sites add`` does)."""
    answer = client.post("/v1/sites", json={"domain": site, "timezone": timezone})
    assert answer.status_code in (200, 201), answer.text


def wait_until_known(client: httpx.Client, site: str, timeout_s: float) -> None:
    """Return once the front behind ``client`` takes events for ``site``.

    A front reads the registry again every ``sites_reload_s``, so a front other than
    the one that registered the site may refuse it for a moment. The probe is an
    engagement event, which a front answers 202 for a registered site and then drops:
    it is never counted.
    """
    probe = tracker_event(site, f"https://{site}/", name="engagement")
    answer = poll(lambda: send_event(client, probe), lambda a: a.status_code == 202, timeout_s)
    assert answer.status_code == 202, (
        f"{client.base_url} still refuses {site} after {timeout_s} s: {answer.text}"
    )


def tracker_event(
    site: str, url: str, name: str = "pageview", referrer: str | None = None, **props: str
) -> dict[str, Any]:
    """A body as the official tracker sends it: one-letter keys."""
    body: dict[str, Any] = {"n": name, "u": url, "d": site, "r": referrer}
    if props:
        body["p"] = props
    return body


def send_event(
    client: httpx.Client,
    body: dict[str, Any],
    ua: str = BROWSER_UA,
    forwarded_for: str | None = None,
    origin: str | None = None,
) -> httpx.Response:
    """POST one event to /api/event as a browser does: text/plain, a User-Agent."""
    headers = {"Content-Type": "text/plain", "User-Agent": ua}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    if origin is not None:
        headers["Origin"] = origin
    return client.post("/api/event", content=orjson.dumps(body), headers=headers)


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float) -> T:
    """``read()`` until ``done`` holds for its value; the last value if it never does
    within ``timeout_s`` (the caller's assertion then says what differed)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.25)
        value = read()
    return value
