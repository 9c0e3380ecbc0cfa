"""Plausible's Stats API v2 (``POST /api/v2/query``) over flowray's insight queries.

A dashboard, script or client library written for Plausible can read flowray's numbers
without change, as far as flowray records what it asks for. This module is the pure
core of that: :func:`translate` turns a request body into a :class:`Plan` (the
:class:`~flowray.query.insights.InsightQuery` to run, and how to write its answer), and
:func:`render` writes an answer in Plausible's shape
(``{"results": [{"metrics", "dimensions"}], "meta", "query"}``). No I/O and no clock:
the caller passes the time, the site's time zone and the range limits.

What is supported, and what is refused with a 400 that names the supported choices:

- metrics: visitors, pageviews, events;
- dimensions: ``time`` (its bucket chosen from the range, as Plausible does),
  ``time:minute|hour|day|week|month``, ``event:page``, ``event:name``, and the
  ``visit:`` dimensions source, utm_medium, utm_campaign, browser, os, device. flowray
  keeps no sessions, so a ``visit:`` dimension is the event's own (a visitor who came
  from two sources counts under both), and session-only ones (``visit:entry_page``,
  ``visit:exit_page``) and those flowray does not derive (countries, goals,
  properties, hostnames, versions) are refused;
- filters: ``is``, ``is_not``, ``contains`` (case-sensitive) and ``and`` of them;
- date ranges: ``day``, ``Nd``, ``month``, ``Nmo``, ``year``, ``all`` and a pair of
  ISO dates or of datetimes with offsets; ``all`` is the longest range the limits
  allow, since flowray does not track when a site's stats start;
- ``include``: the documented keys. ``time_labels`` and ``total_rows`` are answered;
  ``imports`` is accepted and answered ``imports_included: false`` (flowray has no
  imported stats, and saying so is what Plausible does when it cannot include them).
  Any other key is refused, as Plausible refuses it, rather than ignored: a client that
  asks for a comparison must not take an answer without one for an answer with one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from flowray.core.router import SiteError, normalize_site
from flowray.query import series
from flowray.query.insights import (
    FILTERS_MAX,
    LIMIT_MAX,
    METRICS,
    OFFSET_MAX,
    Filter,
    InsightAnswer,
    InsightError,
    InsightQuery,
)

# Plausible's dimension -> flowray's fact column.
DIMENSIONS = {
    "event:page": "path",
    "event:name": "name",
    "visit:source": "source",
    "visit:utm_medium": "utm_medium",
    "visit:utm_campaign": "utm_campaign",
    "visit:browser": "browser",
    "visit:os": "os",
    "visit:device": "device",
}
# Plausible's time dimension -> flowray's interval (None: chosen from the range).
TIME_DIMENSIONS: dict[str, str | None] = {
    "time": None,
    "time:minute": "minute",
    "time:hour": "hour",
    "time:day": "day",
    "time:week": "week",
    "time:month": "month",
}
OPERATORS = ("is", "is_not", "contains")
INCLUDE_KEYS = ("imports", "time_labels", "total_rows")
REQUEST_KEYS = (
    "site_id",
    "metrics",
    "date_range",
    "dimensions",
    "filters",
    "order_by",
    "include",
    "pagination",
)
RANGE_NAMES = ("day", "Nd (e.g. 7d, 30d)", "month", "Nmo (e.g. 6mo, 12mo)", "year", "all")
# Plausible's own bounds on "Nd" and "Nmo".
DAYS_N_MAX = 5_000
MONTHS_N_MAX = 100
# How deep "and" may nest; deeper is no real query, only work.
FILTER_DEPTH_MAX = 4
TEXT_SHOWN_MAX = 80

# Plausible's labels for an empty value (its SQL's "Direct / None" and "(not set)").
NO_REFERRER = "Direct / None"
NOT_SET = "(not set)"
EMPTY_LABELS = {
    "source": NO_REFERRER,
    "utm_medium": NOT_SET,
    "utm_campaign": NOT_SET,
    "browser": NOT_SET,
    "os": NOT_SET,
    "device": NOT_SET,
}
# Plausible names device types capitalized ("Desktop"); flowray in lower case.
DEVICE_LABELS = {d: d.capitalize() for d in ("desktop", "mobile", "tablet", "bot", "other")}

SiteTimezone = Callable[[str], str | None]
_EPOCH_DATE = date(1970, 1, 1)


class PlausibleError(ValueError):
    """A request this API refuses; the route answers ``{"error": message}`` with 400."""


@dataclass(frozen=True)
class Span:
    """A query's time range: [start_ms, end_ms), its first and last local dates, and
    how Plausible echoes it (both ends inclusive, to the second, in the site's zone)."""

    start_ms: int
    end_ms: int
    first: date
    last: date
    echo: tuple[str, str]


@dataclass(frozen=True)
class Plan:
    """A translated request: the query to run, and what its answer needs to be written
    as Plausible writes it."""

    site: str
    query: InsightQuery
    metrics: tuple[str, ...]
    # The request's dimensions in its order, a time dimension resolved ("time:day").
    dimensions: tuple[str, ...]
    span: Span
    time_labels: bool
    total_rows: bool
    imports: bool
    echo: dict[str, Any]

    def follow_up(self, answer: InsightAnswer) -> InsightQuery | None:
        """The query that counts the rows past this page, for ``include.total_rows``;
        None when the page itself tells (it is not full, so nothing follows it)."""
        query = self.query
        if not self.total_rows or _rows_known(query, answer):
            return None
        after = query.offset + query.limit if answer.rows else 0
        return dataclasses.replace(query, offset=min(after, OFFSET_MAX), limit=LIMIT_MAX)


def _rows_known(query: InsightQuery, answer: InsightAnswer) -> bool:
    return len(answer.rows) < query.limit and (bool(answer.rows) or query.offset == 0)


def site_of(body: object) -> str:
    """The normalized ``site_id`` of a request, read first: access is checked on it
    before anything else of the request is looked at."""
    if not isinstance(body, dict):
        raise PlausibleError("The request body must be a JSON object.")
    if "site_id" not in body:
        raise PlausibleError("Missing site_id: the domain of the site to query.")
    try:
        return normalize_site(body["site_id"])
    except SiteError as exc:
        raise PlausibleError(f"Invalid site_id {_shown(body['site_id'])}: {exc}") from exc


def translate(
    body: object,
    *,
    now_ms: int,
    days_max: Mapping[str, int],
    site_timezone: SiteTimezone | None = None,
) -> Plan:
    """Check a request body and plan its query.

    ``now_ms`` dates the relative ranges ("day" is today in the site's zone);
    ``days_max`` is the longest range per interval ("day" also bounds queries without a
    time dimension); ``site_timezone`` names a site's IANA zone (None, or no registry:
    UTC). Raises PlausibleError naming what is wrong and what is supported.
    """
    site = site_of(body)
    fields = _fields(body)
    zone_name = (site_timezone(site) if site_timezone is not None else None) or "UTC"
    try:
        zone = series.parse_zone(zone_name)
    except series.RangeError as exc:
        raise PlausibleError(f"site {site}: {exc}") from exc
    metrics = _metrics(fields["metrics"])
    dimensions, time_name = _dimensions(fields.get("dimensions", []))
    filters = _filters(fields.get("filters", []), depth=0)
    include = _include(fields.get("include", {}), time_name is not None)
    limit, offset = _pagination(fields.get("pagination", {}))
    interval = TIME_DIMENSIONS[time_name] if time_name is not None else None
    span = _span(fields["date_range"], zone, now_ms, days_max, interval or "day")
    if time_name is not None and interval is None:
        interval = _auto_interval(span.first, span.last)
        time_name = f"time:{interval}"
        dimensions = tuple(time_name if d == "time" else d for d in dimensions)
    _check_range(span, interval or "day", days_max)
    order = _order_by(fields.get("order_by"), metrics, dimensions, time_name)
    try:
        query = InsightQuery(
            site=site,
            start_ms=span.start_ms,
            end_ms=span.end_ms,
            zone=zone,
            metrics=metrics,
            filters=filters,
            dimensions=tuple(DIMENSIONS[d] for d in dimensions if d in DIMENSIONS),
            interval=interval,
            order_by=tuple((_column(n), d) for n, d in order),  # type: ignore[misc]
            limit=limit,
            offset=offset,
        )
    except InsightError as exc:
        raise PlausibleError(str(exc)) from exc
    echo = {
        "site_id": site,
        "metrics": list(metrics),
        "date_range": list(span.echo),
        "filters": fields.get("filters", []),
        "dimensions": list(dimensions),
        "order_by": [[n, d] for n, d in order],
        "include": {k: v for k, v in include.items() if v},
        "pagination": {"limit": limit, "offset": offset},
    }
    return Plan(site, query, metrics, dimensions, span, **include, echo=echo)


def _fields(body: object) -> dict[str, Any]:
    """The request's keys, every one known and the required ones present (Plausible's
    schema refuses unknown keys too)."""
    if not isinstance(body, dict):
        raise PlausibleError("The request body must be a JSON object.")
    unknown = sorted(str(k) for k in body if k not in REQUEST_KEYS)
    if unknown:
        raise PlausibleError(
            f"Unknown key(s) {', '.join(_shown(k) for k in unknown)}; "
            f"a query has {', '.join(REQUEST_KEYS)}."
        )
    for key in ("metrics", "date_range"):
        if key not in body:
            raise PlausibleError(f"Missing {key}.")
    return body


# --------------------------------------------------------------------------- parts


def _metrics(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise PlausibleError(f"metrics: a non-empty list of {', '.join(METRICS)}.")
    for name in value:
        if name not in METRICS:
            raise PlausibleError(
                f"Unsupported metric {_shown(name)}; supported metrics: {', '.join(METRICS)}."
            )
    if len(set(value)) != len(value):
        raise PlausibleError("metrics: each metric at most once.")
    return tuple(value)


def _dimensions(value: object) -> tuple[tuple[str, ...], str | None]:
    """The request's dimensions, and its time dimension if any (at most one)."""
    if not isinstance(value, list):
        raise PlausibleError("dimensions: a list.")
    supported = ", ".join([*TIME_DIMENSIONS, *DIMENSIONS])
    for name in value:
        if name not in DIMENSIONS and name not in TIME_DIMENSIONS:
            raise PlausibleError(
                f"Unsupported dimension {_shown(name)}; supported dimensions: {supported}."
            )
    if len(set(value)) != len(value):
        raise PlausibleError("dimensions: each dimension at most once.")
    times = [d for d in value if d in TIME_DIMENSIONS]
    if len(times) > 1:
        raise PlausibleError("dimensions: at most one time dimension.")
    return tuple(value), (times[0] if times else None)


def _filters(value: object, depth: int) -> tuple[Filter, ...]:
    """Simple filters, and ``and`` of filters flattened: a top-level list is an ``and``
    too, so the result is one conjunction, as InsightQuery takes it."""
    if not isinstance(value, list):
        raise PlausibleError("filters: a list of filters.")
    out: list[Filter] = []
    for item in value:
        if isinstance(item, list) and len(item) == 2 and item[0] == "and":
            if depth >= FILTER_DEPTH_MAX:
                raise PlausibleError(f"filters: 'and' nests at most {FILTER_DEPTH_MAX} deep.")
            out.extend(_filters(item[1], depth + 1))
        else:
            out.append(_filter(item))
        if len(out) > FILTERS_MAX:
            raise PlausibleError(f"filters: at most {FILTERS_MAX} filters in all.")
    return tuple(out)


def _filter(item: object) -> Filter:
    if isinstance(item, list) and item and item[0] not in OPERATORS:
        raise PlausibleError(
            f"Unsupported filter operator {_shown(item[0])}; "
            f"supported: {', '.join(OPERATORS)}, and."
        )
    if not isinstance(item, list) or not 3 <= len(item) <= 4:
        raise PlausibleError(
            f"Invalid filter {_shown(item)}: expected [operator, dimension, [values]]."
        )
    op, name, values = item[0], item[1], item[2]
    if name in TIME_DIMENSIONS:
        raise PlausibleError("Time dimensions cannot be filtered on; set date_range instead.")
    if name not in DIMENSIONS:
        raise PlausibleError(
            f"Unsupported filter dimension {_shown(name)}; supported: {', '.join(DIMENSIONS)}."
        )
    if len(item) == 4 and item[3] not in ({}, {"case_sensitive": True}):
        raise PlausibleError(
            f"Unsupported filter modifiers {_shown(item[3])}: flowray's filters are case-sensitive."
        )
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise PlausibleError(f"Invalid filter {_shown(item)}: values are a list of strings.")
    column = DIMENSIONS[name]
    if op != "contains":
        values = [_stored_value(column, v) for v in values]
    elif column == "device":
        values = [v.lower() for v in values]
    try:
        return Filter(column, op, tuple(values))
    except InsightError as exc:
        raise PlausibleError(f"Invalid filter {_shown(item)}: {exc}.") from exc


def _stored_value(column: str, value: str) -> str:
    """What flowray stores for a label Plausible shows: "" for its empty-value labels
    (as Plausible's own filters read them), lower case for device types."""
    if value == NOT_SET or (
        value == NO_REFERRER and column in ("source", "utm_medium", "utm_campaign")
    ):
        return ""
    return value.lower() if column == "device" else value


def _include(value: object, has_time: bool) -> dict[str, bool]:
    if not isinstance(value, dict):
        raise PlausibleError("include: an object.")
    for key, flag in value.items():
        if key not in INCLUDE_KEYS:
            raise PlausibleError(
                f"Unsupported include key {_shown(key)}; supported: {', '.join(INCLUDE_KEYS)}."
            )
        if not isinstance(flag, bool):
            raise PlausibleError(f"include.{key}: true or false.")
    flags = {k: bool(value.get(k, False)) for k in INCLUDE_KEYS}
    if flags["time_labels"] and not has_time:
        raise PlausibleError("include.time_labels needs a time dimension.")
    return flags


def _pagination(value: object) -> tuple[int, int]:
    if not isinstance(value, dict) or any(k not in ("limit", "offset") for k in value):
        raise PlausibleError("pagination: an object with limit and offset.")
    limit, offset = value.get("limit", LIMIT_MAX), value.get("offset", 0)
    if type(limit) is not int or not 1 <= limit <= LIMIT_MAX:
        raise PlausibleError(f"pagination.limit: an integer 1..{LIMIT_MAX}.")
    if type(offset) is not int or not 0 <= offset <= OFFSET_MAX:
        raise PlausibleError(f"pagination.offset: an integer 0..{OFFSET_MAX}.")
    return limit, offset


def _order_by(
    value: object, metrics: tuple[str, ...], dimensions: tuple[str, ...], time_name: str | None
) -> list[tuple[str, str]]:
    """The order as asked, or Plausible's default: the time dimension ascending, then
    the first metric descending. Names are echoed as the query's (time resolved)."""
    if value is None:
        first = [(time_name, "asc")] if time_name is not None else []
        return [*first, (metrics[0], "desc")]
    if not isinstance(value, list) or not value:
        raise PlausibleError("order_by: a non-empty list of [metric or dimension, direction].")
    known = {*metrics, *dimensions, *(["time"] if time_name else [])}
    out: list[tuple[str, str]] = []
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in ("asc", "desc")):
            raise PlausibleError(f"Invalid order_by entry {_shown(entry)}.")
        if entry[0] not in known:
            raise PlausibleError(
                f"Invalid order_by entry {_shown(entry)}. "
                "Entry is not a queried metric or dimension."
            )
        name = time_name if entry[0] == "time" else entry[0]
        out.append((str(name), entry[1]))
    if len({n for n, _ in out}) != len(out):
        raise PlausibleError("order_by: each metric or dimension at most once.")
    return out


def _column(name: str) -> str:
    """flowray's column for an order_by name: "time", a fact column, or a metric."""
    return "time" if name in TIME_DIMENSIONS else DIMENSIONS.get(name, name)


# --------------------------------------------------------------------------- time


def _span(
    value: object, zone: ZoneInfo, now_ms: int, days_max: Mapping[str, int], interval: str
) -> Span:
    """The range of a ``date_range``: named ranges are whole local dates from today
    (``now_ms`` in the zone); a pair is two dates (both included) or two datetimes."""
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, str) for v in value):
            raise PlausibleError(f"Invalid date_range {_shown(value)}: expected [start, end].")
        return _pair(value[0], value[1], zone)
    if not isinstance(value, str):
        raise PlausibleError(
            f"Invalid date_range {_shown(value)}; one of {', '.join(RANGE_NAMES)}."
        )
    today = datetime.fromtimestamp(now_ms / 1000, zone).date()
    first, last = _named_dates(value, today, days_max[interval])
    return _dates_span(first, last, zone)


def _named_dates(name: str, today: date, days_max: int) -> tuple[date, date]:
    """Plausible's named ranges: "Nd" and "Nmo" end before today (and before this
    month), "month" and "year" are the whole current month and year."""
    if name == "day":
        return today, today
    if name == "month":
        return today.replace(day=1), _month_end(today)
    if name == "year":
        return today.replace(month=1, day=1), today.replace(month=12, day=31)
    if name == "all":
        return max(today - timedelta(days=days_max - 1), _EPOCH_DATE), today
    count = _count_of(name, "d", DAYS_N_MAX)
    if count is not None:
        return today - timedelta(days=count), today - timedelta(days=1)
    count = _count_of(name, "mo", MONTHS_N_MAX)
    if count is not None:
        this_month = today.replace(day=1)
        return _add_months(this_month, -count), this_month - timedelta(days=1)
    raise PlausibleError(f"Invalid date_range {_shown(name)}; one of {', '.join(RANGE_NAMES)}.")


def _count_of(name: str, suffix: str, most: int) -> int | None:
    digits = name.removesuffix(suffix)
    if digits == name or not digits.isascii() or not digits.isdigit() or len(digits) > 5:
        return None
    count = int(digits)
    if not 1 <= count <= most:
        raise PlausibleError(f"date_range {name!r}: N is 1..{most}.")
    return count


def _pair(start: str, end: str, zone: ZoneInfo) -> Span:
    """Two ISO dates, both included, or two datetimes with offsets, both included to
    the second (Plausible's reading). flowray counts by the minute, so a datetime
    range holds the minutes that start within it."""
    dates = [_as_date(start), _as_date(end)]
    if dates[0] is not None and dates[1] is not None:
        if dates[1] < dates[0]:
            raise PlausibleError("date_range: the end date is before the start date.")
        return _dates_span(dates[0], dates[1], zone)
    for text in (start, end):
        if not _has_offset(text):
            raise PlausibleError(
                f"Invalid date_range {_shown([start, end])}: two ISO dates, or two "
                "datetimes with offsets."
            )
    try:
        start_ms, last_ms = series.parse_time(start, zone), series.parse_time(end, zone)
    except series.RangeError as exc:
        raise PlausibleError(f"Invalid date_range: {exc}.") from exc
    end_ms = last_ms - last_ms % 1000 + 1000
    if end_ms <= start_ms:
        raise PlausibleError("date_range: the end is before the start.")
    first, last = (_local(ms, zone).date() for ms in (start_ms, end_ms - 1000))
    return Span(
        start_ms, end_ms, first, last, (_echo_time(start_ms, zone), _echo_time(end_ms - 1000, zone))
    )


def _as_date(text: str) -> date | None:
    if len(text) != 10:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def _has_offset(text: str) -> bool:
    if len(text) > 64:
        return False
    try:
        return datetime.fromisoformat(text.upper()).tzinfo is not None
    except ValueError:
        return False


def _dates_span(first: date, last: date, zone: ZoneInfo) -> Span:
    try:
        start_ms = series.parse_time(first.isoformat(), zone)
        end_ms = series.parse_time((last + timedelta(days=1)).isoformat(), zone)
    except (series.RangeError, OverflowError) as exc:
        raise PlausibleError(f"Invalid date_range: {exc}.") from exc
    return Span(
        start_ms, end_ms, first, last, (_echo_time(start_ms, zone), _echo_time(end_ms - 1000, zone))
    )


def _check_range(span: Span, interval: str, days_max: Mapping[str, int]) -> None:
    try:
        series.check_range(span.start_ms, span.end_ms, interval, days_max[interval])
    except series.RangeError as exc:
        raise PlausibleError(f"date_range: {exc}.") from exc


def _auto_interval(first: date, last: date) -> str:
    """Plausible's bucket for ``time``: month when the range spans a whole month or
    more, day when it spans more than a day, else hour."""
    months = (last.year - first.year) * 12 + last.month - first.month - (last.day < first.day)
    if months > 0:
        return "month"
    return "day" if last > first else "hour"


def _month_end(day: date) -> date:
    return _add_months(day.replace(day=1), 1) - timedelta(days=1)


def _add_months(first_of_month: date, months: int) -> date:
    index = first_of_month.year * 12 + first_of_month.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def _local(epoch_ms: int, zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).astimezone(zone)


def _echo_time(epoch_ms: int, zone: ZoneInfo) -> str:
    return _local(epoch_ms - epoch_ms % 1000, zone).isoformat(timespec="seconds")


def time_labels(starts_ms: list[int] | np.ndarray, plan: Plan) -> list[str]:
    """Plausible's labels of bucket starts: ``2024-08-20 01:00:00`` (local wall time)
    for minutes and hours, ``2024-08-20`` for days, weeks and months. A week that began
    before the range is labelled with the range's first date, as Plausible does.

    A repeated hour (a zone falling back) keeps its two buckets, which then share a
    label: flowray does not merge them, since visitors of two buckets do not add up.
    """
    interval = plan.query.interval
    if interval is None or len(starts_ms) == 0:
        return []
    texts = series.labels(np.asarray(starts_ms, dtype=np.int64), plan.query.zone, interval)
    if interval in ("minute", "hour"):
        return [t[:19].replace("T", " ") for t in texts]
    first = plan.span.first.isoformat()
    if interval == "week":
        return [max(t[:10], first) for t in texts]
    return [t[:10] for t in texts]


# --------------------------------------------------------------------------- answer


def render(
    plan: Plan, answer: InsightAnswer, follow_up: InsightAnswer | None = None
) -> dict[str, Any]:
    """The answer in Plausible's shape; ``follow_up`` is the answer to
    ``plan.follow_up(answer)`` when that was a query."""
    index = {name: i for i, name in enumerate(answer.columns)}
    labels = (
        iter(time_labels([row[index["time"]] for row in answer.rows], plan))
        if "time" in index
        else iter(())
    )
    results = []
    for row in answer.rows:
        label = next(labels, None)
        dims = [
            label if d in TIME_DIMENSIONS else _label(DIMENSIONS[d], row[index[DIMENSIONS[d]]])
            for d in plan.dimensions
        ]
        results.append(
            {"metrics": [int(row[index[m]] or 0) for m in plan.metrics], "dimensions": dims}
        )
    return {"results": results, "meta": _meta(plan, answer, follow_up), "query": plan.echo}


def _label(column: str, value: object) -> str:
    text = "" if value is None else str(value)
    if not text:
        return EMPTY_LABELS.get(column, text)
    return DEVICE_LABELS.get(text, text) if column == "device" else text


def _meta(plan: Plan, answer: InsightAnswer, follow_up: InsightAnswer | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if plan.imports:
        meta["imports_included"] = False
    if plan.time_labels:
        starts = series.bucket_starts(
            plan.span.start_ms, plan.span.end_ms, str(plan.query.interval), plan.query.zone
        )
        meta["time_labels"] = time_labels(starts, plan)
    if plan.total_rows:
        meta["total_rows"] = _total_rows(plan, answer, follow_up)
    return dict(sorted(meta.items()))


def _total_rows(plan: Plan, answer: InsightAnswer, follow_up: InsightAnswer | None) -> int:
    """Exact while the rows after the page number fewer than one more page of LIMIT_MAX
    (then the follow-up saw them all); past that, the rows seen, a lower bound."""
    query = plan.query
    if _rows_known(query, answer) or follow_up is None:
        return query.offset + len(answer.rows)
    after = query.offset + query.limit if answer.rows else 0
    return min(after, OFFSET_MAX) + len(follow_up.rows)


def _shown(value: object) -> str:
    """A value as an error names it: JSON-like, and cut short."""
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    return text if len(text) <= TEXT_SHOWN_MAX else text[: TEXT_SHOWN_MAX - 3] + "..."
