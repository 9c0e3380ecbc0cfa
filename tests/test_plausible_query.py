"""Plausible's Stats API v2 over flowray: the translation both ways as table tests
(every supported field, every refusal and its message), and the route in-process
through ``httpx.ASGITransport`` with insight engines faked: one that records queries
and answers what the test says, one that runs the real insight SQL with DuckDB over
facts the test writes, so the counts are checked against counts made here."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import httpx
import pyarrow as pa
import pytest
from fastapi import FastAPI

from flowray.api.app import create_app
from flowray.api.auth import Authorizer, TokenStore
from flowray.api.common import Unavailable
from flowray.config import Settings
from flowray.core.router import ShardMap
from flowray.query import plausible, series
from flowray.query.cache import MemoryCache
from flowray.query.insights import (
    FACTS_SCHEMA,
    LIMIT_MAX,
    Filter,
    InsightAnswer,
    InsightError,
    InsightQuery,
    sql,
)
from flowray.warehouse.sites import SiteRegistry, SiteStore
from tests.fakes import FakeAdmin, client_for

NOW_MS = 1_724_150_000_000  # 2024-08-20T10:33:20Z, a Tuesday
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DAYS_MAX = {"minute": 31, "hour": 1098, "day": 18300, "week": 18300, "month": 18300}
BERLIN = "Europe/Berlin"
SITE = "dummy.site"


def body(**changes: Any) -> dict[str, Any]:
    """A valid request, with ``changes`` (a value of None drops the key)."""
    out: dict[str, Any] = {"site_id": SITE, "metrics": ["visitors"], "date_range": "7d"}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def plan_of(zone: str | None = None, now_ms: int = NOW_MS, **changes: Any) -> plausible.Plan:
    return plausible.translate(
        body(**changes), now_ms=now_ms, days_max=DAYS_MAX, site_timezone=lambda _site: zone
    )


def ms(text: str) -> int:
    return series.parse_time(text, ZoneInfo("UTC"))


# ------------------------------------------------------------------ the translation


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, {"metrics": ("visitors",), "dimensions": (), "interval": None, "filters": ()}),
        (
            {"metrics": ["events", "visitors", "pageviews"]},
            {"metrics": ("events", "visitors", "pageviews")},
        ),
        ({"site_id": "Dummy.SITE."}, {"site": SITE}),
        (
            {"dimensions": ["event:page", "event:name", "visit:source", "visit:utm_medium"]},
            {"dimensions": ("path", "name", "source", "utm_medium")},
        ),
        (
            {"dimensions": ["visit:utm_campaign", "visit:browser", "visit:os", "visit:device"]},
            {"dimensions": ("utm_campaign", "browser", "os", "device")},
        ),
        ({"dimensions": ["time:minute"], "date_range": "day"}, {"interval": "minute"}),
        ({"dimensions": ["time:hour"]}, {"interval": "hour"}),
        ({"dimensions": ["time:day"]}, {"interval": "day"}),
        ({"dimensions": ["time:week"]}, {"interval": "week"}),
        ({"dimensions": ["time:month"]}, {"interval": "month"}),
        ({"dimensions": ["time"], "date_range": "day"}, {"interval": "hour"}),
        ({"dimensions": ["time"], "date_range": "7d"}, {"interval": "day"}),
        ({"dimensions": ["time"], "date_range": "12mo"}, {"interval": "month"}),
        ({"dimensions": ["time"], "date_range": ["2024-01-15", "2024-02-14"]}, {"interval": "day"}),
        (
            {"dimensions": ["time"], "date_range": ["2024-01-15", "2024-02-15"]},
            {"interval": "month"},
        ),
        ({"pagination": {"limit": 3, "offset": 6}}, {"limit": 3, "offset": 6}),
        ({"pagination": {}}, {"limit": LIMIT_MAX, "offset": 0}),
        ({}, {"order_by": (("visitors", "desc"),)}),
        (
            {"dimensions": ["visit:source", "time:day"], "metrics": ["events", "visitors"]},
            {"order_by": (("time", "asc"), ("events", "desc"))},
        ),
        (
            {
                "dimensions": ["visit:source", "time"],
                "order_by": [["visit:source", "asc"], ["time", "desc"], ["visitors", "asc"]],
            },
            {"order_by": (("source", "asc"), ("time", "desc"), ("visitors", "asc"))},
        ),
    ],
)
def test_translates_every_supported_field(
    changes: dict[str, Any], expected: dict[str, Any]
) -> None:
    query = plan_of(**changes).query
    for name, value in expected.items():
        assert getattr(query, name) == value, name


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([["is", "event:page", ["/a", "/b"]]], [Filter("path", "is", ("/a", "/b"))]),
        ([["is_not", "event:name", ["pageview"]]], [Filter("name", "is_not", ("pageview",))]),
        ([["contains", "visit:source", ["goo"]]], [Filter("source", "contains", ("goo",))]),
        # Plausible's labels of an empty value select the empty value.
        ([["is", "visit:source", ["Direct / None"]]], [Filter("source", "is", ("",))]),
        (
            [["is_not", "visit:utm_medium", ["Direct / None"]]],
            [Filter("utm_medium", "is_not", ("",))],
        ),
        (
            [["is", "visit:browser", ["(not set)", "Firefox"]]],
            [Filter("browser", "is", ("", "Firefox"))],
        ),
        ([["is", "event:page", ["Direct / None"]]], [Filter("path", "is", ("Direct / None",))]),
        # Plausible names device types capitalized; flowray stores them in lower case.
        (
            [["is", "visit:device", ["Desktop", "Mobile"]]],
            [Filter("device", "is", ("desktop", "mobile"))],
        ),
        ([["contains", "visit:device", ["Tab"]]], [Filter("device", "contains", ("tab",))]),
        (
            [["is", "visit:os", ["Linux"], {"case_sensitive": True}]],
            [Filter("os", "is", ("Linux",))],
        ),
        (
            [["and", [["is", "visit:os", ["Linux"]], ["and", [["is", "event:page", ["/"]]]]]]],
            [Filter("os", "is", ("Linux",)), Filter("path", "is", ("/",))],
        ),
        ([], []),
    ],
)
def test_filters(filters: list[Any], expected: list[Filter]) -> None:
    plan = plan_of(filters=filters)
    assert plan.query.filters == tuple(expected)
    assert plan.echo["filters"] == filters, "echoed as asked"


@pytest.mark.parametrize(
    ("date_range", "start", "last"),
    [
        ("day", "2024-08-20T00:00:00+02:00", "2024-08-20T23:59:59+02:00"),
        ("7d", "2024-08-13T00:00:00+02:00", "2024-08-19T23:59:59+02:00"),
        ("28d", "2024-07-23T00:00:00+02:00", "2024-08-19T23:59:59+02:00"),
        ("30d", "2024-07-21T00:00:00+02:00", "2024-08-19T23:59:59+02:00"),
        ("month", "2024-08-01T00:00:00+02:00", "2024-08-31T23:59:59+02:00"),
        ("6mo", "2024-02-01T00:00:00+01:00", "2024-07-31T23:59:59+02:00"),
        ("12mo", "2023-08-01T00:00:00+02:00", "2024-07-31T23:59:59+02:00"),
        ("year", "2024-01-01T00:00:00+01:00", "2024-12-31T23:59:59+01:00"),
        ("all", "1974-07-15T00:00:00+01:00", "2024-08-20T23:59:59+02:00"),
        (["2024-03-30", "2024-03-31"], "2024-03-30T00:00:00+01:00", "2024-03-31T23:59:59+02:00"),
        (
            ["2024-01-01T12:00:00+02:00", "2024-01-01T15:59:59+02:00"],
            "2024-01-01T11:00:00+01:00",
            "2024-01-01T14:59:59+01:00",
        ),
        (
            ["2024-01-01T10:00:00Z", "2024-01-01T10:30:00.250Z"],
            "2024-01-01T11:00:00+01:00",
            "2024-01-01T11:30:00+01:00",
        ),
    ],
)
def test_date_ranges_in_the_sites_zone(date_range: Any, start: str, last: str) -> None:
    """Named ranges are whole local dates from today in the site's zone; both ends of
    the echo are inclusive to the second, as Plausible writes them."""
    plan = plan_of(BERLIN, date_range=date_range)
    assert plan.echo["date_range"] == [start, last]
    assert plan.query.start_ms == series.parse_time(start, ZoneInfo("UTC"))
    assert plan.query.end_ms == series.parse_time(last, ZoneInfo("UTC")) + 1000
    assert plan.query.zone.key == BERLIN


def test_all_is_bounded_by_the_interval_limit() -> None:
    minutes = plan_of(date_range="all", dimensions=["time:minute"])
    assert minutes.query.end_ms - minutes.query.start_ms == 31 * DAY_MS
    assert minutes.echo["date_range"][0] == "2024-07-21T00:00:00+00:00"


def test_without_a_registry_or_a_zone_sites_are_utc() -> None:
    no_registry = plausible.translate(body(date_range="day"), now_ms=NOW_MS, days_max=DAYS_MAX)
    assert no_registry.query.zone.key == "UTC"
    assert plan_of(None, date_range="day").query.start_ms == ms("2024-08-20")


def test_the_echo_is_the_query_as_run() -> None:
    plan = plan_of(
        BERLIN,
        metrics=["visitors", "events"],
        dimensions=["time", "visit:source"],
        include={"total_rows": True, "imports": False},
        pagination={"limit": 5},
    )
    assert plan.echo == {
        "site_id": SITE,
        "metrics": ["visitors", "events"],
        "date_range": ["2024-08-13T00:00:00+02:00", "2024-08-19T23:59:59+02:00"],
        "filters": [],
        "dimensions": ["time:day", "visit:source"],
        "order_by": [["time:day", "asc"], ["visitors", "desc"]],
        "include": {"total_rows": True},
        "pagination": {"limit": 5, "offset": 0},
    }


SUPPORTED_METRICS = "supported metrics: visitors, pageviews, events"
SUPPORTED_DIMENSIONS = "supported dimensions: time, time:minute, time:hour"


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ([], "must be a JSON object"),
        (body(site_id=None), "Missing site_id"),
        (body(site_id=7), "Invalid site_id 7"),
        (body(site_id="not a site!"), 'Invalid site_id "not a site!"'),
        (body(period="7d"), 'Unknown key(s) "period"; a query has site_id, metrics'),
        (body(metrics=None), "Missing metrics"),
        (body(date_range=None), "Missing date_range"),
        (body(metrics=["bounce_rate"]), f'Unsupported metric "bounce_rate"; {SUPPORTED_METRICS}'),
        (body(metrics=["visits"]), f'Unsupported metric "visits"; {SUPPORTED_METRICS}'),
        (body(metrics=[]), "metrics: a non-empty list"),
        (body(metrics="visitors"), "metrics: a non-empty list"),
        (body(metrics=["visitors", "visitors"]), "each metric at most once"),
        (body(dimensions=["visit:entry_page"]), 'Unsupported dimension "visit:entry_page"; '),
        (body(dimensions=["visit:country"]), SUPPORTED_DIMENSIONS),
        (body(dimensions=["event:props:author"]), 'Unsupported dimension "event:props:author"'),
        (body(dimensions="event:page"), "dimensions: a list"),
        (body(dimensions=["time:day", "time:hour"]), "at most one time dimension"),
        (body(dimensions=["event:page", "event:page"]), "each dimension at most once"),
        (body(filters=[["contains_not", "event:page", ["/a"]]]), 'operator "contains_not"'),
        (
            body(filters=[["matches", "event:page", ["^/a"]]]),
            "supported: is, is_not, contains, and",
        ),
        (body(filters=[["or", [["is", "event:page", ["/a"]]]]]), 'operator "or"'),
        (body(filters=[["not", ["is", "event:page", ["/a"]]]]), 'operator "not"'),
        (body(filters=[["is", "time:day", ["2024-01-01"]]]), "set date_range instead"),
        (body(filters=[["is", "visit:country", ["EE"]]]), 'filter dimension "visit:country"'),
        (body(filters=[["is", "event:page"]]), "expected [operator, dimension, [values]]"),
        (body(filters=[["is", "event:page", [1]]]), "values are a list of strings"),
        (body(filters=[["is", "event:page", []]]), "a filter takes 1 to 32 values"),
        (
            body(filters=[["contains", "event:page", ["a"], {"case_sensitive": False}]]),
            "flowray's filters are case-sensitive",
        ),
        (body(filters={"is": 1}), "filters: a list of filters"),
        (body(filters=[["is", "event:page", ["/"]]] * 17), "at most 16 filters"),
        (
            body(filters=[["and", [["and", [["and", [["and", [["and", []]]]]]]]]]]),
            "nests at most 4 deep",
        ),
        (body(include={"compare": "previous_period"}), 'include key "compare"; supported'),
        (body(include={"time_labels": "yes", "dimensions": None}), "include.time_labels: true or"),
        (body(include={"time_labels": True}), "include.time_labels needs a time dimension"),
        (body(include=[]), "include: an object"),
        (body(pagination={"limit": 0}), "pagination.limit: an integer 1..10000"),
        (body(pagination={"limit": 10_001}), "pagination.limit"),
        (body(pagination={"limit": True}), "pagination.limit"),
        (body(pagination={"offset": -1}), "pagination.offset: an integer 0..1000000"),
        (body(pagination={"page": 2}), "pagination: an object with limit and offset"),
        (body(order_by=[["pageviews", "desc"]]), "Entry is not a queried metric or dimension"),
        (body(order_by=[["time", "asc"]]), "Entry is not a queried metric or dimension"),
        (
            body(order_by=[["visitors", "up"]]),
            'Invalid order_by entry ["visitors", "up"]'.replace('"', "'"),
        ),
        (
            body(order_by=[["visitors", "asc"], ["visitors", "desc"]]),
            "each metric or dimension at most",
        ),
        (body(order_by=[]), "order_by: a non-empty list"),
        (body(date_range="realtime"), 'Invalid date_range "realtime"; one of day, Nd'),
        (body(date_range="0d"), "date_range '0d': N is 1..5000"),
        (body(date_range="5001d"), "N is 1..5000"),
        (body(date_range="101mo"), "N is 1..100"),
        (body(date_range=7), "Invalid date_range 7"),
        (body(date_range=["2024-01-02", "2024-01-01"]), "the end date is before the start date"),
        (body(date_range=["2024-01-01"]), "expected [start, end]"),
        (body(date_range=["2024-01-01T00:00:00", "2024-01-02T00:00:00"]), "datetimes with offsets"),
        (body(date_range=["2024-01-01", "2024-01-02T00:00:00Z"]), "datetimes with offsets"),
        (body(date_range=["1960-01-01", "1960-01-02"]), "outside 1970-01-01"),
        (body(date_range="year", dimensions=["time:minute"]), "exceeds the limit of 31 days"),
    ],
)
def test_refusals_name_what_is_wrong(request_body: Any, message: str) -> None:
    with pytest.raises(plausible.PlausibleError) as caught:
        plausible.translate(request_body, now_ms=NOW_MS, days_max=DAYS_MAX)
    assert message in str(caught.value)


def test_a_site_with_an_unknown_zone_is_refused() -> None:
    with pytest.raises(plausible.PlausibleError, match="dummy.site: unknown time zone"):
        plan_of("Mars/Olympus")


# ------------------------------------------------------------------------ the answer


def answer_of(plan: plausible.Plan, rows: list[tuple[Any, ...]]) -> InsightAnswer:
    return InsightAnswer(plan.query.columns, rows, provisional=False, watermark=None)


@pytest.mark.parametrize(
    ("dimension", "date_range", "starts", "labels"),
    [
        ("time:minute", "day", ["2024-08-20T01:07:00+02:00"], ["2024-08-20 01:07:00"]),
        ("time:hour", "day", ["2024-08-20T13:00:00+02:00"], ["2024-08-20 13:00:00"]),
        ("time:day", "7d", ["2024-08-13T00:00:00+02:00"], ["2024-08-13"]),
        # A week that began before the range is labelled with the range's first date.
        (
            "time:week",
            "30d",
            ["2024-07-15T00:00:00+02:00", "2024-07-22T00:00:00+02:00"],
            ["2024-07-21", "2024-07-22"],
        ),
        ("time:month", "6mo", ["2024-03-01T00:00:00+01:00"], ["2024-03-01"]),
    ],
)
def test_time_labels_as_plausible_writes_them(
    dimension: str, date_range: str, starts: list[str], labels: list[str]
) -> None:
    plan = plan_of(BERLIN, dimensions=[dimension], date_range=date_range)
    rows = [(ms(s), 1) for s in starts]
    results = plausible.render(plan, answer_of(plan, rows))["results"]
    assert [r["dimensions"][0] for r in results] == labels


def test_time_labels_meta_covers_the_range() -> None:
    day = plan_of(BERLIN, dimensions=["time:hour"], date_range="day", include={"time_labels": True})
    labels = plausible.render(day, answer_of(day, []))["meta"]["time_labels"]
    assert len(labels) == 24 and labels[0] == "2024-08-20 00:00:00"
    assert labels[-1] == "2024-08-20 23:00:00"
    # The day Berlin falls back has 25 hours; the repeated one keeps its two buckets.
    fall = plan_of(
        BERLIN,
        dimensions=["time:hour"],
        date_range=["2024-10-27", "2024-10-27"],
        include={"time_labels": True},
    )
    labels = plausible.render(fall, answer_of(fall, []))["meta"]["time_labels"]
    assert len(labels) == 25 and labels.count("2024-10-27 02:00:00") == 2
    weeks = plan_of(dimensions=["time:week"], date_range="30d", include={"time_labels": True})
    labels = plausible.render(weeks, answer_of(weeks, []))["meta"]["time_labels"]
    # 30d ends on Monday 2024-08-19, which begins a week of its own.
    assert labels == [
        "2024-07-21",
        "2024-07-22",
        "2024-07-29",
        "2024-08-05",
        "2024-08-12",
        "2024-08-19",
    ]


def test_results_in_the_requests_order_with_plausibles_empty_labels() -> None:
    plan = plan_of(
        metrics=["events", "visitors"],
        dimensions=["visit:source", "time:day", "visit:device", "visit:utm_medium", "event:page"],
    )
    day = ms("2024-08-13")
    rows = [
        (day, "", "desktop", "", "", None, 0),  # columns: time, dimensions, then metrics
        (day, "google.com", "", "email", "/a", 4, 2),
    ]
    answer = plausible.render(plan, answer_of(plan, rows))
    assert answer["results"] == [
        {
            "metrics": [0, 0],
            "dimensions": ["Direct / None", "2024-08-13", "Desktop", "(not set)", ""],
        },
        {"metrics": [4, 2], "dimensions": ["google.com", "2024-08-13", "(not set)", "email", "/a"]},
    ]
    assert answer["meta"] == {}
    assert answer["query"] == plan.echo


def test_totals_without_dimensions() -> None:
    plan = plan_of(metrics=["visitors", "pageviews"])
    answer = plausible.render(plan, answer_of(plan, [(None, None)]))
    assert answer["results"] == [{"metrics": [0, 0], "dimensions": []}]


def test_imports_are_never_included() -> None:
    plan = plan_of(include={"imports": True})
    assert plausible.render(plan, answer_of(plan, [(1,)]))["meta"] == {"imports_included": False}


@pytest.mark.parametrize(
    ("pagination", "page_rows", "follow_up", "more_rows", "total"),
    [
        ({"limit": 5, "offset": 0}, 3, None, 0, 3),  # a page not full tells
        ({"limit": 5, "offset": 10}, 2, None, 0, 12),
        ({"limit": 5, "offset": 0}, 0, None, 0, 0),
        ({"limit": 5, "offset": 0}, 5, (5, LIMIT_MAX), 7, 12),  # a full page asks on
        ({"limit": 5, "offset": 20}, 0, (0, LIMIT_MAX), 9, 9),  # past the end: from 0
    ],
)
def test_total_rows(
    pagination: dict[str, int],
    page_rows: int,
    follow_up: tuple[int, int] | None,
    more_rows: int,
    total: int,
) -> None:
    plan = plan_of(dimensions=["event:page"], pagination=pagination, include={"total_rows": True})
    answer = answer_of(plan, [(f"/{i}", 1) for i in range(page_rows)])
    more = plan.follow_up(answer)
    assert (None if more is None else (more.offset, more.limit)) == follow_up
    extra = None
    if more is not None:
        assert (
            dataclasses.replace(more, offset=plan.query.offset, limit=plan.query.limit)
            == plan.query
        )
        extra = answer_of(plan, [(f"/m{i}", 1) for i in range(more_rows)])
    assert plausible.render(plan, answer, extra)["meta"] == {"total_rows": total}
    assert plan_of(dimensions=["event:page"]).follow_up(answer) is None, "only when asked"


# ----------------------------------------------------------------------- the route


class DuckInsights:
    """The real insight SQL (flowray.query.insights.sql) run by DuckDB over facts in
    memory: an engine without the warehouse, whose answers the test can count."""

    def __init__(self, facts: list[dict[str, Any]]) -> None:
        self.facts = facts
        self.queries: list[InsightQuery] = []

    async def run(self, query: InsightQuery) -> InsightAnswer:
        self.queries.append(query)
        rows = [f for f in self.facts if f["site"] == query.site]
        con = duckdb.connect()
        try:
            con.register("facts", pa.Table.from_pylist(rows, schema=FACTS_SCHEMA))
            if query.interval is not None:
                starts = series.bucket_starts(
                    query.start_ms, query.end_ms, query.interval, query.zone
                )
                con.register("buckets", pa.table({"start": starts}))
            text, params = sql(query, query.interval is not None)
            found = con.execute(text, params).fetchall()
        finally:
            con.close()
        return InsightAnswer(query.columns, found, provisional=True, watermark=None)


class ScriptedInsights:
    """Answers with what ``script`` does with each query (raise, sleep, return)."""

    def __init__(self, script: Callable[[InsightQuery], Any]) -> None:
        self.script = script

    async def run(self, query: InsightQuery) -> InsightAnswer:
        result = self.script(query)
        if asyncio.iscoroutine(result):
            result = await result
        return InsightAnswer(query.columns, result, provisional=False, watermark=None)


def fact(minute: str, visitor: int | None, **fields: Any) -> dict[str, Any]:
    row = {
        "site": SITE,
        "minute": ms(minute),
        "count": 1,
        "events": 0,
        "visitor": visitor,
        "name": "pageview",
        "path": "/",
        "source": "",
        "utm_medium": "",
        "utm_campaign": "",
        "browser": "Firefox",
        "os": "Linux",
        "device": "desktop",
    }
    row.update(fields)
    return row


# Two days of a site: the same visitors come back, so visitors do not add up.
FACTS = [
    fact("2024-08-13T08:00:00Z", 1, path="/a", source="google.com"),
    fact("2024-08-13T08:01:00Z", 1, path="/b", count=3),
    fact("2024-08-13T09:00:00Z", 2, path="/a", source="google.com", device="mobile"),
    fact("2024-08-14T08:00:00Z", 1, path="/a", name="signup", count=1, events=1),
    fact("2024-08-14T10:00:00Z", 3, path="/c", source="news.example", browser=""),
    fact("2024-08-14T11:00:00Z", None, path="/a"),  # no visitor id: counts as a pageview
    fact("2024-08-14T11:00:00Z", 9, site="other.example"),
]


# A path under a file: no registry can ever be there, so every site is in UTC.
NO_SITES = Path("/dev/null/sites.sqlite")


def make_app(
    insights: Any,
    authorizer: Authorizer | None = None,
    sites: SiteRegistry | None = None,
    **settings: Any,
) -> FastAPI:
    return create_app(
        settings=Settings(shards=4, groups=2, **settings),
        shard_map=ShardMap.round_robin(4, 2),
        ingest=None,  # type: ignore[arg-type]
        warehouse=None,  # type: ignore[arg-type]
        admin=FakeAdmin(),
        cache=MemoryCache(),
        clock=lambda: NOW_MS / 1000,
        authorizer=authorizer,
        insights=insights,
        sites=sites or SiteRegistry(SiteStore(NO_SITES), reload_s=60),
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine() -> DuckInsights:
    return DuckInsights(FACTS)


@pytest.fixture
async def client(engine: DuckInsights) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(engine)) as c:
        yield c


async def ask(client: httpx.AsyncClient, **changes: Any) -> httpx.Response:
    return await client.post("/api/v2/query", json=body(**changes))


@pytest.mark.anyio
async def test_breakdown_counts_match_the_facts(client: httpx.AsyncClient) -> None:
    response = await ask(
        client,
        metrics=["visitors", "pageviews", "events"],
        dimensions=["event:page"],
        include={"total_rows": True},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    # Counted here: /a has visitors 1 and 2 (and an anonymous pageview), 4 pageviews
    # (three of them page views, one the signup event), /b one visitor with 3.
    assert answer["results"] == [
        {"metrics": [2, 3, 1], "dimensions": ["/a"]},
        {"metrics": [1, 3, 0], "dimensions": ["/b"]},
        {"metrics": [1, 1, 0], "dimensions": ["/c"]},
    ]
    assert answer["meta"] == {"total_rows": 3}
    assert answer["query"]["site_id"] == SITE


@pytest.mark.anyio
async def test_a_timeseries_with_filters(client: httpx.AsyncClient) -> None:
    response = await ask(
        client,
        metrics=["visitors", "pageviews"],
        dimensions=["time"],
        filters=[["is_not", "visit:source", ["Direct / None"]]],
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [
        {"metrics": [2, 2], "dimensions": ["2024-08-13"]},
        {"metrics": [1, 1], "dimensions": ["2024-08-14"]},
    ]


@pytest.mark.anyio
async def test_visitors_are_counted_once_over_the_range(client: httpx.AsyncClient) -> None:
    response = await ask(client, metrics=["visitors", "events"])
    assert response.json()["results"] == [{"metrics": [3, 1], "dimensions": []}]
    sources = await ask(client, dimensions=["visit:source", "visit:browser", "visit:device"])
    assert sources.json()["results"] == [
        {"metrics": [1], "dimensions": ["Direct / None", "Firefox", "Desktop"]},
        {"metrics": [1], "dimensions": ["google.com", "Firefox", "Desktop"]},
        {"metrics": [1], "dimensions": ["google.com", "Firefox", "Mobile"]},
        {"metrics": [1], "dimensions": ["news.example", "(not set)", "Desktop"]},
    ]


@pytest.mark.anyio
async def test_pages_and_the_total_behind_them(
    client: httpx.AsyncClient, engine: DuckInsights
) -> None:
    response = await ask(
        client,
        dimensions=["event:page"],
        pagination={"limit": 2, "offset": 0},
        order_by=[["event:page", "desc"]],
        include={"total_rows": True},
    )
    answer = response.json()
    assert [r["dimensions"] for r in answer["results"]] == [["/c"], ["/b"]]
    assert answer["meta"] == {"total_rows": 3}
    assert [(q.offset, q.limit) for q in engine.queries] == [(0, 2), (2, LIMIT_MAX)]


@pytest.mark.anyio
async def test_a_refused_query_is_400_with_plausibles_shape(client: httpx.AsyncClient) -> None:
    response = await ask(client, metrics=["bounce_rate"])
    assert response.status_code == 400
    assert response.json() == {
        "error": 'Unsupported metric "bounce_rate"; supported metrics: visitors, pageviews, events.'
    }
    bad_json = await client.post(
        "/api/v2/query", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400 and bad_json.json() == {
        "error": "The request body is not JSON."
    }
    huge = await client.post("/api/v2/query", content=b" " * (64 * 1024 + 1))
    assert huge.status_code == 413 and "over 65536 bytes" in huge.json()["error"]


@pytest.mark.anyio
async def test_the_engine_refusing_is_400() -> None:
    def refuse(_query: InsightQuery) -> Any:
        raise InsightError("offset past the end")

    async with client_for(make_app(ScriptedInsights(refuse))) as c:
        response = await ask(c)
    assert response.status_code == 400 and response.json() == {"error": "offset past the end"}


@pytest.mark.anyio
@pytest.mark.parametrize("engine_kind", ["none", "slow", "unavailable"])
async def test_no_engine_or_a_slow_one_is_503(engine_kind: str) -> None:
    async def slow(_query: InsightQuery) -> list[Any]:
        await asyncio.sleep(5)
        return []

    def unavailable(_query: InsightQuery) -> Any:
        raise Unavailable("no master for group 1", retry_after_s=2)

    insights = {
        "none": None,
        "slow": ScriptedInsights(slow),
        "unavailable": ScriptedInsights(unavailable),
    }[engine_kind]
    async with client_for(make_app(insights, query_timeout_s=0.05)) as c:
        response = await ask(c)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == ("2" if engine_kind == "unavailable" else "1")
    assert set(response.json()) == {"error"}


@pytest.mark.anyio
async def test_a_read_token_reads_only_its_sites(tmp_path: Path, engine: DuckInsights) -> None:
    store = TokenStore(tmp_path / "tokens.sqlite")
    mine, _ = store.create("read", sites=[SITE])
    others, _ = store.create("read", sites=["other.example"])
    writer, _ = store.create("ingest", sites=[SITE])
    async with client_for(make_app(engine, Authorizer(store, mode="on"))) as c:

        async def status(token: str | None, site: str = SITE) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await c.post("/api/v2/query", json=body(site_id=site), headers=headers)
            return response.status_code

        assert await status(None) == 401
        assert await status("fr_not-a-token") == 401
        assert await status(writer) == 403
        assert await status(others) == 403
        assert await status(mine) == 200
        assert await status(mine, site="DUMMY.site.") == 200  # checked once normalized
    assert len(engine.queries) == 2, "refused requests never reach the engine"


@pytest.mark.anyio
async def test_the_route_is_in_the_openapi_document(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    operation = document["paths"]["/api/v2/query"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["site_id", "metrics", "date_range"]
    assert {"400", "401", "403", "413", "503"} <= set(operation["responses"])


@pytest.mark.anyio
async def test_days_follow_the_registered_zone(tmp_path: Path, engine: DuckInsights) -> None:
    store = SiteStore(tmp_path / "sites.sqlite")
    store.add(SITE, BERLIN)
    registry = SiteRegistry(store, reload_s=60)
    async with client_for(make_app(engine, sites=registry)) as c:
        answer = (await ask(c, date_range="day", site_id="dummy.site")).json()
        other = (await ask(c, date_range="day", site_id="other.example")).json()
    assert answer["query"]["date_range"] == [
        "2024-08-20T00:00:00+02:00",
        "2024-08-20T23:59:59+02:00",
    ]
    assert other["query"]["date_range"][0] == "2024-08-20T00:00:00+00:00", "not registered: UTC"
    assert [q.zone.key for q in engine.queries] == [BERLIN, "UTC"]


@pytest.mark.anyio
async def test_an_unreadable_registry_is_503(tmp_path: Path, engine: DuckInsights) -> None:
    """Days cut in the wrong zone would be wrong numbers, not a smaller answer."""
    broken = SiteRegistry(SiteStore(tmp_path), reload_s=60, read_timeout_s=0.1)
    async with client_for(make_app(engine, sites=broken)) as c:
        response = await ask(c)
    assert response.status_code == 503 and "registry" in response.json()["error"]
    assert engine.queries == []
