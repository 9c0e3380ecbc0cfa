"""Insight queries: visitors, pageviews and events of one site, by time bucket and by
dimension, with filters, over the warehouse's facts and the live facts of what it
does not hold yet.

A *fact* row is one (site, minute, visitor, event name, page path, source, UTM
medium, UTM campaign, browser, OS, device) with the number of events in it
(``count``) and of those the custom events (``events``); see FACTS_SCHEMA. Processing
writes them (``flowray.tasks.mapreduce``), a master keeps the raw events of unpublished
blocks from which the query side derives the same rows (``flowray.query.live``).
Visitors are counted exactly, ``count(DISTINCT visitor)`` over the rows of a bucket, so
one visitor counts once however many minutes, hours or days of the bucket hold them,
whatever the zone. Events without a visitor id count as pageviews or events, not as
visitors.

This module holds the query model and turns a query into one DuckDB statement; it
reads no file itself (the caller registers the rows as ``facts``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pyarrow as pa

from flowray.query import series

METRICS = ("visitors", "pageviews", "events")
# Breakdown and filter dimensions; "name" is the event name ("pageview" for page views).
DIMENSIONS = ("path", "source", "utm_medium", "utm_campaign", "browser", "os", "device", "name")
OPS = ("is", "is_not", "contains")
PAGEVIEW = "pageview"
FILTER_VALUES_MAX = 32
FILTER_CHARS_MAX = 2048
FILTERS_MAX = 16
LIMIT_MAX = 10_000
OFFSET_MAX = 1_000_000

# The facts a query reads, by name: the warehouse's unit files and the live rows.
FACTS_SCHEMA = pa.schema(
    [
        pa.field("site", pa.string(), nullable=False),
        pa.field("minute", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("events", pa.int64(), nullable=False),
        pa.field("visitor", pa.uint64()),
        pa.field("name", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("utm_medium", pa.string(), nullable=False),
        pa.field("utm_campaign", pa.string(), nullable=False),
        pa.field("browser", pa.string(), nullable=False),
        pa.field("os", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
    ]
)


class InsightError(ValueError):
    """A bad metric, dimension, filter, order or page; the API answers it with 422."""


@dataclass(frozen=True)
class Filter:
    """Keep rows whose ``dimension`` is one of ``values`` (is), none of them (is_not), or
    contains one of them as a substring, case-sensitively (contains)."""

    dimension: str
    op: Literal["is", "is_not", "contains"]
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.dimension not in DIMENSIONS:
            raise InsightError(
                f"unknown filter dimension {_short(self.dimension)}; one of {', '.join(DIMENSIONS)}"
            )
        if self.op not in OPS:
            raise InsightError(
                f"unknown filter operator {_short(self.op)}; one of {', '.join(OPS)}"
            )
        if not self.values or len(self.values) > FILTER_VALUES_MAX:
            raise InsightError(f"a filter takes 1 to {FILTER_VALUES_MAX} values")
        for value in self.values:
            if type(value) is not str or len(value) > FILTER_CHARS_MAX:
                raise InsightError(f"filter values are strings of at most {FILTER_CHARS_MAX} chars")


def parse_filter(text: str) -> Filter:
    """``DIMENSION:OP:VALUE`` with values separated by ``|``, e.g. ``path:is:/a|/b``."""
    dimension, sep1, rest = text.partition(":")
    op, sep2, values = rest.partition(":")
    if not (sep1 and sep2):
        raise InsightError(
            f"filter {_short(text)} is not DIMENSION:OP:VALUE (e.g. browser:is:Firefox)"
        )
    return Filter(dimension, op, tuple(values.split("|")))  # type: ignore[arg-type]


def parse_metrics(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Metric names from a comma-separated string or a list; unknown ones refused."""
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    if not names or any(not m for m in names):
        raise InsightError(f"metrics: a comma-separated list of {', '.join(METRICS)}")
    for name in names:
        if name not in METRICS:
            raise InsightError(f"unknown metric {_short(name)}; one of {', '.join(METRICS)}")
    if len(set(names)) != len(names):
        raise InsightError("metrics: each at most once")
    return tuple(names)


@dataclass(frozen=True)
class InsightQuery:
    """One query over [start_ms, end_ms) of one site.

    ``interval`` groups by time buckets of the zone (see flowray.query.series), then by
    ``dimensions``; with neither, one row of totals. ``order_by`` names metrics or
    grouping columns ("time" for the bucket); the default is time ascending, else the
    first metric descending, then the dimensions ascending, so pages are stable.
    """

    site: str
    start_ms: int
    end_ms: int
    zone: ZoneInfo
    metrics: tuple[str, ...] = METRICS
    filters: tuple[Filter, ...] = ()
    dimensions: tuple[str, ...] = ()
    interval: str | None = None
    order_by: tuple[tuple[str, Literal["asc", "desc"]], ...] = ()
    limit: int = LIMIT_MAX
    offset: int = 0

    def __post_init__(self) -> None:
        parse_metrics(self.metrics)
        for dimension in self.dimensions:
            if dimension not in DIMENSIONS:
                raise InsightError(
                    f"unknown dimension {_short(dimension)}; one of {', '.join(DIMENSIONS)}"
                )
        if len(set(self.dimensions)) != len(self.dimensions):
            raise InsightError("dimensions: each at most once")
        if self.interval is not None and self.interval not in series.INTERVALS:
            raise InsightError(f"interval must be one of {', '.join(series.INTERVALS)}")
        if len(self.filters) > FILTERS_MAX:
            raise InsightError(f"at most {FILTERS_MAX} filters")
        if not 1 <= self.limit <= LIMIT_MAX:
            raise InsightError(f"limit must be 1..{LIMIT_MAX}")
        if not 0 <= self.offset <= OFFSET_MAX:
            raise InsightError(f"offset must be 0..{OFFSET_MAX}")
        if self.end_ms <= self.start_ms:
            raise InsightError("end must be after start")
        columns = set(self.columns)
        for name, direction in self.order_by:
            if name not in columns:
                raise InsightError(f"order_by {_short(name)}: not a metric or dimension queried")
            if direction not in ("asc", "desc"):
                raise InsightError("order_by direction: asc or desc")

    @property
    def columns(self) -> tuple[str, ...]:
        """The answer's columns: "time" (bucket start, epoch ms) if any, dimensions, metrics."""
        time = ("time",) if self.interval is not None else ()
        return (*time, *self.dimensions, *self.metrics)

    def previous(self) -> InsightQuery:
        """The same query over the period of equal length just before this one."""
        span = self.end_ms - self.start_ms
        return dataclasses.replace(self, start_ms=self.start_ms - span, end_ms=self.start_ms)


_METRIC_SQL = {
    "visitors": "count(DISTINCT visitor)::BIGINT",
    "pageviews": "(sum(count) - sum(events))::BIGINT",
    "events": "sum(events)::BIGINT",
}


def sql(query: InsightQuery, buckets: bool) -> tuple[str, list[Any]]:
    """The statement over ``facts`` (and ``buckets(start)`` when the query has an
    interval), with its parameters; rows come out in ``query.columns`` order."""
    where = ["epoch_ms(minute) >= ?", "epoch_ms(minute) < ?"]
    params: list[Any] = [
        query.start_ms,
        query.end_ms,
    ]
    for f in query.filters:
        clause, values = _filter_sql(f)
        where.append(clause)
        params.extend(values)
    groups = [*(["b.start"] if buckets else []), *query.dimensions]
    select = [
        *(["b.start AS time"] if buckets else []),
        *query.dimensions,
        *(f"{_METRIC_SQL[m]} AS {m}" for m in query.metrics),
    ]
    source = "facts"
    if buckets:
        source = "facts f ASOF JOIN buckets b ON epoch_ms(f.minute) >= b.start"
    text = f"SELECT {', '.join(select)} FROM {source} WHERE {' AND '.join(where)}"
    if groups:
        text += f" GROUP BY {', '.join(groups)}"
        text += f" ORDER BY {', '.join(_order(query))}"
        text += f" LIMIT {int(query.limit)} OFFSET {int(query.offset)}"
    return text, params


def _filter_sql(f: Filter) -> tuple[str, list[str]]:
    marks = ", ".join("?" * len(f.values))
    if f.op == "is":
        return f"{f.dimension} IN ({marks})", list(f.values)
    if f.op == "is_not":
        return f"{f.dimension} NOT IN ({marks})", list(f.values)
    return "(" + " OR ".join(f"contains({f.dimension}, ?)" for _ in f.values) + ")", list(f.values)


def _order(query: InsightQuery) -> list[str]:
    named = [(("time" if n == "time" else n), d) for n, d in query.order_by]
    if not named:
        if query.interval is not None:
            named.append(("time", "asc"))
        elif query.metrics:
            named.append((query.metrics[0], "desc"))
    seen = {n for n, _ in named}
    # Every grouping column last, so equal metrics come in one stable order.
    named += [
        (n, "asc") for n in ("time", *query.dimensions) if n in query.columns and n not in seen
    ]
    return [f"{n} {d.upper()}" for n, d in named]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


@dataclass(frozen=True)
class InsightAnswer:
    """Rows in ``columns`` order; a "time" column holds bucket starts in epoch ms.
    ``provisional``: some rows hold events not processed yet. ``watermark``: processed
    up to here (epoch ms), None when nothing is."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    provisional: bool
    watermark: int | None
