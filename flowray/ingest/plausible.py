"""Plausible's Events API, read: one ``POST /api/event`` body into flowray events.

Plausible's tracker (and any client written for its Events API) sends one JSON object
per page view or custom event, under long or one-letter keys: ``name``/``n``,
``url``/``u``, ``domain``/``d`` (one site, or several separated by commas: one event
each), ``referrer``/``r`` and ``props``/``p`` (an object, or the JSON text of one).
The official tracker sends it as ``text/plain`` so that browsers skip the CORS
preflight; the body is read as JSON whatever its content type.

This module is pure: no clock, no files, no network. The caller (flowray.api.tracker)
passes the time, the User-Agent, the client address and the day's salt, and commits
the events. What it keeps is chosen for privacy:

- the page's path, with only the campaign parameters of its query (``utm_*``, ``ref``,
  ``source``): other parameters carry e-mail addresses, reset tokens and session ids,
  and the fragment is dropped for the same reason;
- the referrer without its query or fragment, for the same reason;
- a visitor id, a keyed hash of the site, address and User-Agent with the day's salt
  (flowray.ingest.visitors_id); the address itself is never part of an event.

Limits follow Plausible's: at most 30 properties, keys of at most 300 characters and
values of at most 2,000, and flowray's own: the serialized properties at most 2,048
characters, an event name at most 128, the body at most 8 KiB. Where Plausible drops
a bad property quietly, flowray refuses the request with a 4xx naming the problem, so
a broken integration shows at once; a property with a null or blank key or value is
dropped, as Plausible drops it, since it says nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from flowray.core.router import SiteError, normalize_site
from flowray.ingest.dimensions import describe_user_agent
from flowray.ingest.rules import RULES
from flowray.ingest.visitors_id import visitor_id

BODY_BYTES_MAX = 8 * 1024
NAME_CHARS_MAX = 128  # the event schema's name field (RULES: visitor_chars_max)
URL_CHARS_MAX = RULES.path_chars_max  # so that a page's path always fits the path field
REFERRER_CHARS_MAX = RULES.path_chars_max
UA_CHARS_MAX = RULES.path_chars_max
PROPS_MAX = 30
PROP_KEY_CHARS_MAX = 300
PROP_VALUE_CHARS_MAX = 2000
PROPS_CHARS_MAX = 2048  # the props field: the JSON text of the object
DOMAINS_MAX = 10  # sites one request may name (Plausible's roll-ups send a few)
PAGEVIEW = "pageview"
# The query parameters a path keeps: the campaign tags Plausible reads. Matched in any
# case, as flowray.ingest.dimensions reads them.
KEPT_QUERY_KEYS = frozenset(
    {"utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "ref", "source"}
)
# Events the tracker sends about a page view already counted (time on page, scroll
# depth): flowray has no such metric, and counting them would double the page views.
UNCOUNTED_NAMES = frozenset({"engagement", "pageleave"})
# Each field's keys, the first present one wins (Plausible reads "n" before "name").
_KEYS = {
    "name": ("n", "name"),
    "url": ("u", "url"),
    "domain": ("d", "domain"),
    "referrer": ("r", "referrer"),
    "props": ("m", "meta", "p", "props"),
}


class PayloadError(ValueError):
    """A request flowray refuses, with the HTTP status to answer and why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Hit:
    """One request, checked: the sites it names (normalized, distinct, in the order
    given) and the fields each of their events gets."""

    sites: tuple[str, ...]
    name: str
    path: str
    referrer: str | None
    props: str | None  # the JSON text of an object of strings, or None

    @property
    def counted(self) -> bool:
        """False for the tracker's follow-up events (see UNCOUNTED_NAMES)."""
        return self.name not in UNCOUNTED_NAMES


# --------------------------------------------------------------------------- the body


def parse_body(body: bytes) -> Hit:
    """The request's event, or :class:`PayloadError` naming the first problem."""
    if len(body) > BODY_BYTES_MAX:
        raise PayloadError(f"body larger than {BODY_BYTES_MAX} bytes", status=413)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    if type(decoded) is not dict:
        raise PayloadError("body: must be a JSON object")
    fields = {name: _first(decoded, keys) for name, keys in _KEYS.items()}
    return Hit(
        sites=parse_domains(fields["domain"]),
        name=parse_name(fields["name"]),
        path=clean_path(fields["url"]),
        referrer=clean_referrer(fields["referrer"]),
        props=parse_props(fields["props"]),
    )


def _first(body: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = body.get(key)
        if value is not None:
            return value
    return None


def parse_name(raw: Any) -> str:
    """The event's name: a string, or an integer as its text (Plausible takes both,
    for 404 tracking by status)."""
    if raw is None or raw == "":
        raise PayloadError("name: missing (send 'name' or 'n', e.g. \"pageview\")")
    if type(raw) is int:
        raw = str(raw)
    if type(raw) is not str:
        raise PayloadError("name: must be a string")
    if len(raw) > NAME_CHARS_MAX:
        raise PayloadError(f"name: longer than {NAME_CHARS_MAX} characters ({len(raw)})")
    return raw


def parse_domains(raw: Any) -> tuple[str, ...]:
    """The sites of ``domain``: one name or several separated by commas."""
    if raw is None or raw == "":
        raise PayloadError("domain: missing (send 'domain' or 'd', the site's name)")
    if type(raw) is not str:
        raise PayloadError("domain: must be a string")
    names = raw.split(",")
    if len(names) > DOMAINS_MAX:
        raise PayloadError(f"domain: names {len(names)} sites; at most {DOMAINS_MAX} are allowed")
    sites: dict[str, None] = {}
    for name in names:
        if not name.strip():
            raise PayloadError("domain: an empty site name in the list")
        try:
            sites[normalize_site(name)] = None
        except SiteError as exc:
            raise PayloadError(f"domain: {exc}") from None
    return tuple(sites)


def clean_path(raw: Any) -> str:
    """The page's path from its URL, with only the campaign parameters of its query."""
    if raw is None or raw == "":
        raise PayloadError("url: missing (send 'url' or 'u', the page's URL)")
    if type(raw) is not str:
        raise PayloadError("url: must be a string")
    if len(raw) > URL_CHARS_MAX:
        raise PayloadError(f"url: longer than {URL_CHARS_MAX} characters ({len(raw)})")
    try:
        split = urlsplit(raw.strip())
    except ValueError:
        raise PayloadError("url: not a valid URL") from None
    if split.scheme.lower() not in ("http", "https") or not split.hostname:
        raise PayloadError("url: must be an http or https URL with a host")
    kept = [
        (key, value)
        for key, value in parse_qsl(split.query, keep_blank_values=False)
        if key.lower() in KEPT_QUERY_KEYS
    ]
    path = (split.path or "/") + (f"?{urlencode(kept)}" if kept else "")
    if len(path) > URL_CHARS_MAX:  # re-encoding can lengthen a query
        raise PayloadError(f"url: its path is longer than {URL_CHARS_MAX} characters")
    return path


def clean_referrer(raw: Any) -> str | None:
    """The referring page without its query or fragment; None for none. Long ones are
    cut, as Plausible cuts them: a referrer is the browser's, not the sender's fault."""
    if raw is None or raw == "":
        return None
    if type(raw) is not str:
        raise PayloadError("referrer: must be a string or null")
    page = raw.strip().partition("#")[0].partition("?")[0]
    return page[:REFERRER_CHARS_MAX] or None


def parse_props(raw: Any) -> str | None:
    """The custom properties as the compact JSON text of an object of strings (numbers
    and booleans as their JSON text, so one property has one type), or None."""
    if raw is None:
        return None
    if type(raw) is str:
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise PayloadError("props: text that is not the JSON of an object") from None
    if type(raw) is not dict:
        raise PayloadError("props: must be an object (or the JSON text of one)")
    props: dict[str, str] = {}
    for key, value in raw.items():
        text = _prop_text(key, value)
        if text is not None and key.strip():
            props[key] = text
    if len(props) > PROPS_MAX:
        raise PayloadError(f"props: {len(props)} properties; at most {PROPS_MAX} are allowed")
    if not props:
        return None
    serialized = orjson.dumps(props).decode()
    if len(serialized) > PROPS_CHARS_MAX:
        raise PayloadError(
            f"props: longer than {PROPS_CHARS_MAX} characters as JSON ({len(serialized)})"
        )
    return serialized


def _prop_text(key: str, value: Any) -> str | None:
    """One property's value as text; None for a value that says nothing (null, blank)."""
    if len(key) > PROP_KEY_CHARS_MAX:
        raise PayloadError(f"props: a key is longer than {PROP_KEY_CHARS_MAX} characters")
    if value is None:
        return None
    if type(value) is str:
        text = value
    elif type(value) is bool:
        text = "true" if value else "false"
    elif type(value) is int or (type(value) is float and math.isfinite(value)):
        text = orjson.dumps(value).decode()
    else:
        raise PayloadError(f"props: {key[:40]!r} must be a string, number or boolean, not nested")
    if len(text) > PROP_VALUE_CHARS_MAX:
        raise PayloadError(
            f"props: the value of {key[:40]!r} is longer than {PROP_VALUE_CHARS_MAX} characters"
        )
    return text if text.strip() else None


# --------------------------------------------------------------------------- events


def is_bot(ua: str | None) -> bool:
    """Whether a program, not a person, sent the request: a crawler's or a library's
    User-Agent, or none at all (browsers always send one). Plausible drops these."""
    return ua is None or not ua.strip() or describe_user_agent(ua).is_bot


def events(hit: Hit, *, ts_ms: int, ua: str, ip: str | None, salt: bytes) -> list[dict[str, Any]]:
    """One event object of ``POST /v1/events`` per site of ``hit``.

    ``ip`` is hashed into the visitor id and nowhere else; None (an address the front
    could not learn) gives no visitor. Events have no id: a tracker's page views are
    each counted.
    """
    return [
        {
            "ts": ts_ms,
            "site": site,
            "path": hit.path,
            "referrer": hit.referrer,
            "ua": ua[:UA_CHARS_MAX],
            "visitor": None if ip is None else visitor_id(salt, site, ip, ua),
            "id": None,
            "name": hit.name,
            "props": hit.props,
        }
        for site in hit.sites
    ]
