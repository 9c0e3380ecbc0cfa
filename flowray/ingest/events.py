"""Parsing and validation of incoming page-view events.

Every way events enter flowray — a JSON or NDJSON body, a ``text/plain`` body of seed-form
lines, or a file read by ``flowray ingest`` — ends here and leaves as one
:class:`pyarrow.Table` with :data:`EVENT_SCHEMA`. This is the ingest hot path, so the
parsers build plain Python column lists, normalize each distinct site once per batch,
compare timestamps against bounds computed once per batch, and make the table in one go;
there are no per-event model objects.

Two policies, on purpose:

* HTTP bodies are all or nothing (the contract says a batch is accepted or rejected as a
  whole), so the body parsers collect *every* bad item and raise :class:`BatchRejected`.
* Files are backfills of real-world logs, where a few garbage lines are normal, so
  :func:`iter_file` reports bad lines with their line numbers and keeps the good ones.

Time never comes from the clock here: the caller passes the server's ``now`` in
:class:`Limits`, which keeps the parsers pure and the tests exact.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import chain, islice
from typing import IO, Any, TypeAlias, cast

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from flowray.core.invariant import InvariantError, require
from flowray.core.router import normalize_site
from flowray.ingest import fastparse
from flowray.ingest.rules import RULES
from flowray.ingest.schema import EVENT_SCHEMA, TS_MIN_MS, Limits
from flowray.ingest.schema import VISITOR_CHARS_MAX as VISITOR_CHARS_MAX  # for importers
from flowray.ingest.visitors_id import IpError, visitor_ids_by_day

ERRORS_LISTED_MAX = 1000
# The optional string fields of an event and the longest value each may hold.
_OPTIONAL_FIELDS: tuple[tuple[str, int], ...] = tuple(
    (f.name, RULES.chars_max(f.name)) for f in RULES.fields if f.chars_limit is not None
)
# The hot paths below name these fields one by one (a loop over them costs more), Row
# holds them in this order, and an empty id is made null by hand: a change to the rules'
# fields must be made there too, and until it is this module refuses to load.
require(
    RULES.names == ("ts", "site", "path", "referrer", "ua", "visitor", "id", "name", "props")
    and [name for name, _ in _OPTIONAL_FIELDS]
    == ["path", "referrer", "ua", "visitor", "id", "name", "props"]
    and [f.name for f in RULES.fields if f.empty_is_null] == ["id"],
    "flowray.ingest.events names other fields than flowray.ingest.rules declares",
)
_PATH_MAX, _REFERRER_MAX, _UA_MAX, _VISITOR_MAX, _ID_MAX, _NAME_MAX, _PROPS_MAX = (
    n for _, n in _OPTIONAL_FIELDS
)
_NUMBERS_AS_TEXT = frozenset(f.name for f in RULES.fields if f.numbers_as_text)
_DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}

FORMATS = ("auto", "seed", "combined", "ndjson")
_DETECT_LINES = 20


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ItemError:
    """One bad item: where it is and why, in words a person sending data can act on.

    ``position`` is the 0-based index in the batch for bodies (-1 for the body as a
    whole) and the 1-based line number for files, which is what editors show.
    """

    position: int
    reason: str


class BatchRejected(ValueError):
    """A body with at least one bad item; the API answers it with 422.

    Every bad item is listed so a client can fix its batch in one round trip, but the
    list is capped at :data:`ERRORS_LISTED_MAX` so a wholly broken 200,000-event batch
    does not produce a huge answer; ``total_errors`` still says how many there were.
    """

    def __init__(self, errors: list[ItemError], message: str = "batch rejected") -> None:
        self.total_errors: int = len(errors)
        self.errors: list[ItemError] = list(errors[:ERRORS_LISTED_MAX])
        self.message = message
        detail = f"{self.total_errors} bad item{'s' if self.total_errors != 1 else ''}"
        if self.errors:
            first = self.errors[0]
            detail += f"; first at position {first.position}: {first.reason}"
        super().__init__(f"{message}: {detail}")


# --------------------------------------------------------------------------- timestamps


def _format_ms(ts_ms: int) -> str:
    """An epoch-ms value as RFC 3339 for messages, or the number if no date can hold it."""
    try:
        moment = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ts_ms} ms"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short_repr(value: object) -> str:
    """A bounded repr, so a megabyte of garbage does not end up in an error answer."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _iso_to_ms(text: str) -> int:
    """Parse an RFC 3339 / ISO-8601 time that carries a zone, exactly, to epoch ms."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:  # RFC 3339 allows a lowercase "t" and "z"; fromisoformat does not.
            moment = datetime.fromisoformat(text.upper())
        except ValueError:
            raise ValueError(
                f"not an RFC 3339 time or epoch milliseconds: {_short_repr(text)}"
            ) from None
    if moment.tzinfo is None:
        raise ValueError(
            f"time {_short_repr(text)} has no zone offset, so it is ambiguous; "
            "add 'Z' for UTC or an offset like '+08:00'"
        )
    delta = moment - _EPOCH  # integer arithmetic: no float rounding of milliseconds
    return delta.days * _DAY_MS + delta.seconds * 1000 + delta.microseconds // 1000


def parse_timestamp(value: object, received_ms: int) -> int:
    """Turn an event's ``ts`` into epoch milliseconds UTC, or raise ValueError saying why.

    A missing ts (None) means the time the server received the event, which the
    caller passes as ``received_ms``. Naive times are refused rather than guessed at,
    because a wrong guess silently shifts a site's traffic by hours. A string of digits
    is taken as epoch milliseconds, as some trackers send numbers quoted.
    """
    if value is None:
        return received_ms
    kind = type(value)
    if kind is int:
        return value  # type: ignore[return-value]
    if kind is str:
        text: str = value  # type: ignore[assignment]
        if text.isdigit() and text.isascii():
            return int(text)
        return _iso_to_ms(text.strip())
    if kind is float:
        number: float = value  # type: ignore[assignment]
        if math.isfinite(number) and number.is_integer():
            return int(number)
        raise ValueError(f"epoch milliseconds must be a whole number, got {_short_repr(value)}")
    if kind is bool:
        raise ValueError("must be an RFC 3339 string or epoch milliseconds, not a boolean")
    raise ValueError(
        f"must be an RFC 3339 string or epoch milliseconds, not {type(value).__name__}"
    )


def _range_reason(ts_ms: int, limits: Limits) -> str:
    """Why ``ts_ms`` is outside the valid range (the caller already knows it is)."""
    if ts_ms < TS_MIN_MS:
        return f"time {_format_ms(ts_ms)} is before {RULES.ts_min_text}"
    return (
        f"time {_format_ms(ts_ms)} is more than {limits.future_skew_ms // 1000} s "
        f"ahead of the server clock ({_format_ms(limits.now_ms)})"
    )


def check_ts_range(ts_ms: int, limits: Limits) -> None:
    """Refuse times before 2000 or beyond the allowed skew ahead of the server clock.

    Years-old backfills are normal, but a 1970 or year-3000 time is a client bug
    (seconds sent as milliseconds, or the reverse) that would create empty partitions.
    """
    if not TS_MIN_MS <= ts_ms <= limits.ts_max_ms:
        raise ValueError(_range_reason(ts_ms, limits))


# --------------------------------------------------------------------------- batch builder


class _Batch:
    """Column lists for one batch plus what is computed once per batch.

    The site cache is per batch (sites repeat within a batch; there is no global
    state), and the valid time range is computed once so the per-event check is a
    single chained comparison.
    """

    __slots__ = (
        "limits",
        "ts_lo",
        "ts_hi",
        "site_override",
        "sites",
        "days",
        "clocks",
        "errors",
        "rows",
    )

    def __init__(self, limits: Limits, site_override: str | None = None) -> None:
        self.limits = limits
        self.ts_lo = TS_MIN_MS
        self.ts_hi = limits.ts_max_ms
        self.site_override = site_override
        self.sites: dict[str, str | ValueError] = {}
        self.days: dict[str, int] = {}  # date text -> epoch ms of its midnight UTC
        self.clocks: dict[str, int] = {}  # "HH:MM" -> ms since midnight
        self.errors: list[ItemError] = []
        # One tuple per good event in EVENT_SCHEMA order: a single append per event is
        # cheaper than seven, and zip(*rows) turns them into columns at the end.
        self.rows: list[Row] = []

    def normalize(self, raw: str) -> str:
        """normalize_site, remembered for the batch (failures too, so they stay cheap)."""
        cached = self.sites.get(raw)
        if cached is None:
            try:
                cached = normalize_site(raw)
            except ValueError as exc:
                cached = exc
            self.sites[raw] = cached
        if isinstance(cached, ValueError):
            raise cached
        return cached

    def in_range(self, ts: int) -> str | None:
        """None when ``ts`` is valid, else the item reason."""
        if self.ts_lo <= ts <= self.ts_hi:
            return None
        return "ts: " + _range_reason(ts, self.limits)

    def reject(self, position: int, reason: str) -> None:
        self.errors.append(ItemError(position, reason))

    def table(self) -> pa.Table:
        """The good events as one table, built once for the batch."""
        return rows_table(self.rows)

    def result_rows(self) -> list[Row]:
        """The good events, or BatchRejected listing every bad item in position order."""
        if self.errors:
            raise BatchRejected(sorted(self.errors, key=lambda e: e.position))
        return self.rows

    def result(self) -> pa.Table:
        """The table, or BatchRejected listing every bad item in position order."""
        return rows_table(self.result_rows())


# One event in EVENT_SCHEMA order: (ts, site, path, referrer, ua, visitor, id, name, props).
_Text: TypeAlias = str | None
Row: TypeAlias = tuple[int, str, _Text, _Text, _Text, _Text, _Text, _Text, _Text]
# A validated batch: an Arrow table, or (for small bodies) its rows, which cost far
# less to make than a table; the ingress builds one table per proposal from them.
Events: TypeAlias = pa.Table | list[Row]
# Bodies up to this size are parsed row by row into Events rows: below it, Arrow's
# fixed cost per call outweighs its speed per event (measured on the reference
# machine: 100 events took 0.2 ms as rows, 1.0 ms as a table).
SMALL_BODY_BYTES = 32 * 1024


def rows_table(rows: list[Row]) -> pa.Table:
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [()] * len(EVENT_SCHEMA)
    return pa.Table.from_arrays(
        [pa.array(column, f.type) for column, f in zip(columns, EVENT_SCHEMA, strict=True)],
        schema=EVENT_SCHEMA,
    )


def events_table(events: Events) -> pa.Table:
    return events if isinstance(events, pa.Table) else rows_table(events)


def event_count(events: Events) -> int:
    return events.num_rows if isinstance(events, pa.Table) else len(events)


def event_sites(events: Events) -> list[str]:
    """The distinct sites of a batch."""
    if isinstance(events, pa.Table):
        return pc.unique(events.column("site")).to_pylist()  # type: ignore[no-any-return]
    return list({row[1] for row in events})


def _optional_string(event: dict[str, Any], name: str, chars_max: int, reasons: list[str]) -> Any:
    """Validate an optional string field; returns the value, or None after noting a reason."""
    value = event.get(name)
    if value is None:
        return None
    if type(value) is not str:
        if name in _NUMBERS_AS_TEXT and type(value) is int:
            return str(value)  # numeric ids are common; store them as their decimal text
        reasons.append(f"{name}: must be a string, not {_json_type(value)}")
        return None
    if len(value) > chars_max:
        reasons.append(f"{name}: longer than {chars_max} characters ({len(value)})")
    return value


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, which is what the sender wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _add_object(batch: _Batch, position: int, event: object, fallback_id: str | None) -> None:
    """Validate one decoded event object and append it, or record every reason it fails.

    All field problems of one item are reported together, so a client fixes them at once.
    """
    if type(event) is not dict:
        batch.reject(position, f"event: must be a JSON object, not {_json_type(event)}")
        return
    reasons: list[str] = []
    site = batch.site_override
    if site is None:
        raw_site = event.get("site")
        if raw_site is None:
            reasons.append("site: missing")
        elif type(raw_site) is not str:
            reasons.append(f"site: must be a string, not {_json_type(raw_site)}")
        else:
            try:
                site = batch.normalize(raw_site)
            except ValueError as exc:
                reasons.append(f"site: {exc}")
    raw_ts = event.get("ts")
    ts = raw_ts if type(raw_ts) is int else None
    if ts is None:
        try:
            ts = parse_timestamp(raw_ts, batch.limits.now_ms)
        except ValueError as exc:
            reasons.append(f"ts: {exc}")
    if ts is not None:
        bad_range = batch.in_range(ts)
        if bad_range is not None:
            reasons.append(bad_range)
    get = event.get
    path, referrer, ua, visitor, event_id, name, props = (
        get("path"),
        get("referrer"),
        get("ua"),
        get("visitor"),
        get("id"),
        get("name"),
        get("props"),
    )
    if not (
        (path is None or (type(path) is str and len(path) <= _PATH_MAX))
        and (referrer is None or (type(referrer) is str and len(referrer) <= _REFERRER_MAX))
        and (ua is None or (type(ua) is str and len(ua) <= _UA_MAX))
        and (visitor is None or (type(visitor) is str and len(visitor) <= _VISITOR_MAX))
        and (event_id is None or (type(event_id) is str and len(event_id) <= _ID_MAX))
        and (name is None or (type(name) is str and len(name) <= _NAME_MAX))
        and (props is None or (type(props) is str and len(props) <= _PROPS_MAX))
    ):  # the rare path: find and name every bad field
        values = [_optional_string(event, key, limit, reasons) for key, limit in _OPTIONAL_FIELDS]
        path, referrer, ua, visitor, event_id, name, props = values
    if reasons:
        batch.reject(position, "; ".join(reasons))
        return
    # An empty id counts as no id: otherwise every event sent with "" would be
    # deduplicated into one.
    batch.rows.append(
        (ts, site, path, referrer, ua, visitor, event_id or fallback_id, name, props)  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- HTTP bodies


def _too_many(count: int, limits: Limits) -> BatchRejected:
    return BatchRejected(
        [ItemError(-1, f"batch has {count} events; at most {limits.batch_events_max} are allowed")]
    )


def parse_json_body(body: bytes, limits: Limits) -> pa.Table:
    """Parse a JSON array of events, or one event object (a tracker's single hit)."""
    return events_table(_parse_json(body, limits, fast=True))


def parse_json_events(body: bytes, limits: Limits) -> Events:
    """:func:`parse_json_body`, with a small body's events as rows."""
    return _parse_json(body, limits, fast=len(body) > SMALL_BODY_BYTES)


def _parse_json(body: bytes, limits: Limits, fast: bool) -> Events:
    table = fastparse.json_body(body, limits) if fast else None
    if table is not None:
        return table
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BatchRejected([ItemError(-1, f"malformed JSON: {exc}")]) from None
    if type(decoded) is dict:
        items: list[object] = [decoded]
    elif type(decoded) is list:
        items = decoded
    else:
        raise BatchRejected(
            [ItemError(-1, "body: must be a JSON array of events or one event object")]
        )
    if not items:
        raise BatchRejected([ItemError(-1, "empty batch")])
    if len(items) > limits.batch_events_max:
        raise _too_many(len(items), limits)
    table = fastparse.json_array(items, limits) if fast else None
    if table is not None:
        return table
    batch = _Batch(limits)
    for position, event in enumerate(items):
        _add_object(batch, position, event, None)
    return batch.result_rows()


def _body_lines(body: bytes) -> list[str]:
    """The body's lines as text; undecodable bytes reject the body, naming the line."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = body.count(b"\n", 0, exc.start)
        raise BatchRejected([ItemError(line, "line: not valid UTF-8")]) from None
    return text.split("\n")


def _check_count(lines: list[str], limits: Limits) -> None:
    """Reject an empty or oversized line-oriented body before parsing any line."""
    count = sum(1 for line in lines if line and not line.isspace())
    if count == 0:
        raise BatchRejected([ItemError(-1, "empty batch")])
    if count > limits.batch_events_max:
        raise _too_many(count, limits)


def parse_ndjson_body(body: bytes, limits: Limits) -> pa.Table:
    """Parse NDJSON: one event object per line; position is the 0-based line index."""
    return events_table(_parse_ndjson(body, limits, fast=True))


def parse_ndjson_events(body: bytes, limits: Limits) -> Events:
    """:func:`parse_ndjson_body`, with a small body's events as rows."""
    return _parse_ndjson(body, limits, fast=len(body) > SMALL_BODY_BYTES)


def _parse_ndjson(body: bytes, limits: Limits, fast: bool) -> Events:
    table = fastparse.ndjson(body, limits) if fast else None
    if table is not None:
        return table
    lines = _body_lines(body)
    _check_count(lines, limits)
    batch = _Batch(limits)
    loads = orjson.loads
    for position, line in enumerate(lines):
        if not line or line.isspace():
            continue
        try:
            event = loads(line)
        except orjson.JSONDecodeError as exc:
            batch.reject(position, f"malformed JSON: {exc}")
            continue
        _add_object(batch, position, event, None)
    return batch.result_rows()


# --------------------------------------------------------------------------- seed form

_SEED = re.compile(
    r"\s*(\d{4}\.\d{2}\.\d{2})[ T](\d{2}:\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:\s+(\S+))?\s*"
)
_SEED_SHAPE = "expected 'yyyy.mm.dd HH:MM:SS[.fff] site'"


def _day_ms(days: dict[str, int], key: str, year: int, month: int, day: int) -> int:
    """Epoch ms of a date's midnight UTC, cached per batch: dates repeat on every line."""
    cached = days.get(key)
    if cached is None:
        cached = (date(year, month, day).toordinal() - _EPOCH_ORDINAL) * _DAY_MS
        days[key] = cached
    return cached


def _clock_ms(clocks: dict[str, int], hour_minute: str, second: str, fraction: str | None) -> int:
    """Milliseconds since midnight; fraction digits are a decimal fraction of a second.

    "HH:MM" has only 1440 values, so its part is cached per batch, leaving one or two
    int() calls per line.
    """
    minute_ms = clocks.get(hour_minute)
    if minute_ms is None:
        h, m = int(hour_minute[:2]), int(hour_minute[3:])
        if h > 23 or m > 59:
            raise ValueError(f"time of day {hour_minute}:{second} is not valid")
        minute_ms = clocks[hour_minute] = (h * 60 + m) * 60_000
    s = int(second)
    if s > 59:
        raise ValueError(f"time of day {hour_minute}:{second} is not valid")
    ms = int((fraction + "00")[:3]) if fraction else 0
    return minute_ms + s * 1000 + ms


def _seed_ts(batch: _Batch, match: re.Match[str]) -> int:
    """The epoch ms of a matched seed line (its date and time are UTC)."""
    date_text, hour_minute, second, fraction, _ = match.groups()
    day_ms = batch.days.get(date_text)
    if day_ms is None:
        try:
            year, month, day = date_text.split(".")
            day_ms = _day_ms(batch.days, date_text, int(year), int(month), int(day))
        except ValueError:
            raise ValueError(f"date {date_text} does not exist") from None
    return day_ms + _clock_ms(batch.clocks, hour_minute, second, fraction)


def _add_seed_line(batch: _Batch, position: int, line: str, fallback_id: str | None) -> None:
    """Parse one seed-form line into the batch, or record why it is bad."""
    match = _SEED.fullmatch(line)
    if match is None:
        batch.reject(position, f"line: {_SEED_SHAPE}, got {_short_repr(line)}")
        return
    try:
        ts = _seed_ts(batch, match)
    except ValueError as exc:
        batch.reject(position, f"ts: {exc}")
        return
    if not batch.ts_lo <= ts <= batch.ts_hi:
        batch.reject(position, "ts: " + _range_reason(ts, batch.limits))
        return
    site = batch.site_override
    if site is None:
        raw_site = match.group(5)
        if raw_site is None:
            batch.reject(position, f"site: missing; {_SEED_SHAPE}")
            return
        try:
            site = batch.normalize(raw_site)
        except ValueError as exc:
            batch.reject(position, f"site: {exc}")
            return
    batch.rows.append((ts, site, None, None, None, None, fallback_id, None, None))


def parse_seed_body(body: bytes, limits: Limits) -> pa.Table:
    """Parse seed-form lines ("2020.03.14 07:20:39.595 taobao.com", UTC)."""
    return events_table(_parse_seed(body, limits, fast=True))


def parse_seed_events(body: bytes, limits: Limits) -> Events:
    """:func:`parse_seed_body`, with a small body's events as rows."""
    return _parse_seed(body, limits, fast=len(body) > SMALL_BODY_BYTES)


def _parse_seed(body: bytes, limits: Limits, fast: bool) -> Events:
    table = fastparse.seed(body, limits) if fast else None
    if table is not None:
        return table
    lines = _body_lines(body)
    _check_count(lines, limits)
    batch = _Batch(limits)
    for position, line in enumerate(lines):
        if line and not line.isspace():
            _add_seed_line(batch, position, line, None)
    return batch.result_rows()


# --------------------------------------------------------------------------- combined log

# "Unrolled" form of (?:[^"\\]|\\.)*: same language, far less backtracking per character.
_QUOTED = r'"([^"\\]*(?:\\.[^"\\]*)*)"'
_COMBINED = re.compile(
    r"(\S+)\s+\S+\s+(?:\S+|\"[^\"]*\")\s+\[([^\]]+)\]\s+"
    + _QUOTED
    + r"\s+(?:\d{3}|-)\s+(?:\d+|-)"
    + r"(?:\s+"
    + _QUOTED
    + r"\s+"
    + _QUOTED
    + r")?(?:\s.*)?"
)
_LOG_TIME = re.compile(
    r"(\d{1,2})/([A-Za-z]{3})/(\d{4}):(\d{2}:\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"\s*([+-])(\d{2}):?(\d{2})"
)
_REQUEST = re.compile(r"[A-Z]+ +(\S+)(?: +HTTP/\d+(?:\.\d+)?)?")
_ESCAPE = re.compile(r"\\([\"\\])")


def _log_ts(batch: _Batch, text: str) -> int:
    """Epoch ms of a log time like "10/Oct/2000:13:55:36 -0700", honouring its offset."""
    match = _LOG_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"not a log time like '10/Oct/2000:13:55:36 -0700': {_short_repr(text)}")
    day, month_name, year, hour_minute, second, fraction, sign, off_h, off_m = match.groups()
    date_text = f"{day}/{month_name}/{year}"
    day_ms = batch.days.get(date_text)
    if day_ms is None:
        month = _MONTHS.get(month_name.capitalize())
        try:
            if month is None:
                raise ValueError
            day_ms = _day_ms(batch.days, date_text, int(year), month, int(day))
        except ValueError:
            raise ValueError(f"date {date_text} does not exist") from None
    offset_ms = (int(off_h) * 60 + int(off_m)) * 60_000
    local_ms = day_ms + _clock_ms(batch.clocks, hour_minute, second, fraction)
    return local_ms - offset_ms if sign == "+" else local_ms + offset_ms


def _log_field(text: str | None) -> str | None:
    """A quoted log field: "-" and absent mean unknown; \\" and \\\\ are unescaped."""
    if text is None or text == "-" or not text:
        return None
    return _ESCAPE.sub(r"\1", text) if "\\" in text else text


def _request_path(request: str) -> str | None:
    """The request target, or None for a garbage request line (the hit still counts)."""
    match = _REQUEST.fullmatch(request)
    return None if match is None else match.group(1)


def _add_combined_line(batch: _Batch, position: int, line: str, fallback_id: str | None) -> None:
    """Parse one combined (or common) log line into the batch, or record why it is bad."""
    match = _COMBINED.fullmatch(line.strip())
    if match is None:
        batch.reject(position, f"line: not a combined or common log line: {_short_repr(line)}")
        return
    client, time_text, request, referrer_text, ua_text = match.groups()
    try:
        ts = _log_ts(batch, time_text)
    except ValueError as exc:
        batch.reject(position, f"ts: {exc}")
        return
    reasons: list[str] = []
    bad_range = batch.in_range(ts)
    if bad_range is not None:
        reasons.append(bad_range)
    path, referrer, ua = _request_path(request), _log_field(referrer_text), _log_field(ua_text)
    # The client address stands in the visitor column only until the chunk is done:
    # _hash_clients then replaces it with a visitor id, before anything leaves this module.
    visitor = None if client == "-" else client
    if not (
        (path is None or len(path) <= _PATH_MAX)
        and (referrer is None or len(referrer) <= _REFERRER_MAX)
        and (ua is None or len(ua) <= _UA_MAX)
        and (visitor is None or len(visitor) <= _VISITOR_MAX)
    ):
        event = {"path": path, "referrer": referrer, "ua": ua, "visitor": visitor}
        for name, limit in _OPTIONAL_FIELDS[:4]:
            _optional_string(event, name, limit, reasons)
    if reasons:
        batch.reject(position, "; ".join(reasons))
        return
    site = batch.site_override
    if site is None:  # iter_file refuses combined logs without a site before reading
        raise InvariantError("combined log parsed without a site")
    batch.rows.append((ts, site, path, referrer, ua, visitor, fallback_id, None, None))


def _hash_clients(table: pa.Table, salt_of_day: Callable[[date], bytes]) -> pa.Table:
    """Replace the client addresses of combined-log events by visitor ids, each a keyed
    hash with its day's salt (see flowray.ingest.visitors_id): no address is stored. A
    client that is not an address (a host name, when the server looked names up) is
    dropped, so the event counts with no visitor."""
    ips = table.column("visitor").combine_chunks()
    for _attempt in range(2):
        try:
            ids = visitor_ids_by_day(
                salt_of_day, table.column("ts"), table.column("site"), ips, table.column("ua")
            )
        except IpError as exc:
            keep = np.ones(len(ips), dtype=bool)
            keep[list(exc.positions)] = False
            ips = pc.if_else(pa.array(keep), ips, pa.nulls(len(ips), pa.string()))
            continue
        index = table.schema.get_field_index("visitor")
        return table.set_column(index, EVENT_SCHEMA.field("visitor"), ids)
    raise InvariantError("client addresses still invalid after the invalid ones were dropped")


# --------------------------------------------------------------------------- files


def _line_kind(line: str) -> str | None:
    """Which file format one line fits, if any."""
    stripped = line.strip()
    if stripped.startswith("{"):
        try:
            return "ndjson" if type(orjson.loads(stripped)) is dict else None
        except orjson.JSONDecodeError:
            return None
    if _SEED.fullmatch(stripped):
        return "seed"
    if _COMBINED.fullmatch(stripped):
        return "combined"
    return None


def detect_format(sample_lines: list[str]) -> str:
    """Guess a file's format from its first lines: the one most of them fit.

    A majority rather than all lines must fit, because real logs carry the odd garbage
    line; when fewer than half fit anything, guessing would be reckless.
    """
    lines = [line for line in sample_lines if line.strip()]
    if not lines:
        raise ValueError("cannot detect the format: no non-blank lines")
    counts: dict[str, int] = {}
    for line in lines:
        kind = _line_kind(line)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    if counts:
        best = max(counts, key=lambda kind: counts[kind])
        if counts[best] * 2 >= len(lines):
            return best
    raise ValueError(
        "cannot detect the format: the first lines are not seed, combined log or NDJSON; "
        "pass the format explicitly"
    )


@dataclass
class FileChunk:
    """One chunk of a file: its good events, its bad lines, and progress figures."""

    events: pa.Table
    bad: list[ItemError] = field(default_factory=list)
    lines: int = 0
    bytes: int = 0


def _line_id(prefix: bytes, line_number: int, raw_line: bytes) -> str:
    """A deterministic id per file line, so re-sending the same file counts it once.

    It hashes the raw bytes, which for a UTF-8 line equals hashing
    f"{basename}\\x00{line_number}\\x00{line_text}" and stays defined for other bytes.
    """
    data = prefix + str(line_number).encode() + b"\x00" + raw_line
    return hashlib.blake2b(data).hexdigest()[:16]


def _add_ndjson_line(batch: _Batch, position: int, line: str, fallback_id: str | None) -> None:
    """Parse one NDJSON file line into the batch; the event's own id beats the line id."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        batch.reject(position, f"malformed JSON: {exc}")
        return
    _add_object(batch, position, event, fallback_id)


_LINE_PARSERS = {
    "seed": _add_seed_line,
    "combined": _add_combined_line,
    "ndjson": _add_ndjson_line,
}


def _open_binary(path: str | os.PathLike[str]) -> tuple[IO[bytes], IO[bytes]]:
    """Open a plain or gzip file (recognized by its magic bytes, not its name).

    Returns the stream of lines and the file on disk, whose position measures progress
    in the bytes the progress bar's total is made of.
    """
    raw = open(path, "rb")  # noqa: SIM115 - closed by iter_file
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")), raw
    raw.seek(0)
    return raw, raw


def _resolve_format(fmt: str, head: list[bytes], site: str | None) -> tuple[str, str | None]:
    """Check the format and site up front, so a wrong invocation fails before any work."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format([line.decode("utf-8", "replace") for line in head])
    site_normalized = normalize_site(site) if site is not None else None
    if fmt == "combined" and site_normalized is None:
        raise ValueError("combined logs carry no site: pass the site (--site DOMAIN)")
    return fmt, site_normalized


def iter_file(
    path: str | os.PathLike[str],
    fmt: str,
    limits: Limits,
    site: str | None = None,
    chunk_lines: int = 10_000,
    with_ids: bool = True,
    salt_of_day: Callable[[date], bytes] | None = None,
) -> Iterator[FileChunk]:
    """Read a log file in chunks of lines, keeping good events and reporting bad lines.

    A backfill of a real access log always has some garbage; one bad line must not stop
    a million good ones, so bad lines are reported with their 1-based line number. The
    date cache lives for the whole file, since a log covers few distinct days.
    Combined logs need ``salt_of_day`` (flowray.storage.salts.ImportSalts.salt_for) to
    turn client addresses into visitor ids.
    """
    if chunk_lines < 1:
        raise ValueError("chunk_lines must be at least 1")
    stream, raw = _open_binary(path)
    with raw, stream:
        head = list(islice(stream, _DETECT_LINES))
        fmt, site_normalized = _resolve_format(fmt, head, site)
        if fmt == "combined" and salt_of_day is None:
            raise ValueError("combined logs are read with salts for their visitor ids")
        parse_line = _LINE_PARSERS[fmt]
        prefix = os.path.basename(os.fspath(path)).encode() + b"\x00"
        days: dict[str, int] = {}
        lines = chain(head, stream)
        line_number = 0
        consumed = 0
        while True:
            chunk = list(islice(lines, chunk_lines))
            if not chunk:
                return
            batch = _Batch(limits, site_normalized)
            batch.days = days
            for raw_line in chunk:
                line_number += 1
                text_bytes = raw_line.rstrip(b"\r\n")
                if not text_bytes.strip():
                    continue
                line_id = _line_id(prefix, line_number, text_bytes) if with_ids else None
                parse_line(batch, line_number, text_bytes.decode("utf-8", "replace"), line_id)
            position = raw.tell()
            table = batch.table()
            if fmt == "combined" and salt_of_day is not None:
                table = _hash_clients(table, salt_of_day)
            yield FileChunk(table, batch.errors, len(chunk), position - consumed)
            consumed = position
