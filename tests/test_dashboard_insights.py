"""The dashboard's insights in a real headless Chromium: totals with their change, the
chart of visitors and pageviews, the top-10 tables, and filters from a clicked row.

The app runs in this process under uvicorn, its insights answered by a fake over a
small fixed list of facts (the real query statement, run by DuckDB over them), so every
number the page must show is known here by hand. A clicked row is a link to a fragment
(``#filter=path%3Ais%3A%2Fpricing``); the test reads each row's link from the dumped
DOM, then opens the page at exactly that address, as the click would, and reads the
filtered numbers. A screenshot shows both series drawn (their colours, their heights).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import duckdb
import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import uvicorn
from fastapi import FastAPI

from flowray.api.app import create_app
from flowray.api.auth import Authorizer, TokenRecord
from flowray.api.common import Insights
from flowray.config import Settings
from flowray.core.router import ShardMap
from flowray.query import insights as model
from flowray.query import series
from flowray.query.cache import MemoryCache
from flowray.query.insights import InsightAnswer, InsightQuery
from tests.fakes import FakeAdmin
from tests.ports import free_port
from tests.test_dashboard import ARTIFACTS, CHROMIUM, _bars, _rgba_rows, _run_chromium

SITE = "shop.example"
DAY = datetime(2024, 5, 1, tzinfo=UTC)
SERVER_START_S = 30
PAGEVIEWS_RGB = frozenset({(0x33, 0x66, 0xAA), (0x99, 0xBB, 0xCC)})  # #36a, #9bc
VISITORS_RGB = frozenset({(0xE8, 0x74, 0x3B), (0xF5, 0xC6, 0xA5)})  # #e8743b, #f5c6a5
# As tests/helpers.py passes them: mypy does not see the settings' defaults.
SETTINGS: dict[str, Any] = {"shards": 2, "groups": 1}
_DESKTOP = ("Desktop", "Chrome", "Windows")
_LINUX = ("Desktop", "Firefox", "Linux")
_IPHONE = ("Mobile", "Safari", "iOS")
_ANDROID = ("Mobile", "Chrome", "Android")
HN = "news.ycombinator.com"


def _fact(
    at: str,
    visitor: int | None,
    path: str,
    source: str,
    tech: tuple[str, str, str],
    count: int = 1,
    name: str = "pageview",
    site: str = SITE,
) -> dict[str, Any]:
    device, browser, os = tech
    return {
        "site": site,
        "minute": datetime.fromisoformat(at),
        "count": count,
        "events": 0 if name == "pageview" else count,
        "visitor": visitor,
        "name": name,
        "path": path,
        "source": source,
        "utm_medium": "",
        "utm_campaign": "",
        "browser": browser,
        "os": os,
        "device": device,
    }


# Four visitors on DAY (and views without a visitor id), two the day before.
FACTS = [
    _fact("2024-05-01T10:05+00:00", 1, "/pricing", "google.com", _DESKTOP, count=2),
    _fact("2024-05-01T10:20+00:00", 1, "/", "google.com", _DESKTOP),
    _fact("2024-05-01T10:30+00:00", 2, "/pricing", "", _IPHONE),
    _fact("2024-05-01T11:10+00:00", 3, "/", HN, _LINUX, count=3),
    _fact("2024-05-01T11:15+00:00", 3, "/pricing", HN, _LINUX, name="signup"),
    _fact("2024-05-01T14:00+00:00", 4, "/blog", "google.com", _ANDROID),
    _fact("2024-05-01T14:30+00:00", None, "/", "", _DESKTOP, count=2),
    _fact("2024-04-30T09:00+00:00", 5, "/", "google.com", _DESKTOP, count=2),
    _fact("2024-04-30T12:00+00:00", 6, "/pricing", "", _IPHONE),
    # Another site's traffic in the same hours must not show up.
    _fact(
        "2024-05-01T10:00+00:00", 1, "/pricing", "google.com", _DESKTOP, 50, site="other.example"
    ),
]


class FactsInsights:
    """Insights over a fixed list of facts: the real statement (flowray.query.insights),
    run by DuckDB over them; every answer final."""

    def __init__(self, facts: list[dict[str, Any]]) -> None:
        self.facts = pa.Table.from_pylist(facts, schema=model.FACTS_SCHEMA)

    async def run(self, query: InsightQuery) -> InsightAnswer:
        text, params = model.sql(query, buckets=query.interval is not None)
        with duckdb.connect() as db:
            db.register("facts", self.facts.filter(pc.equal(self.facts["site"], query.site)))
            if query.interval is not None:
                starts = series.bucket_starts(
                    query.start_ms, query.end_ms, query.interval, query.zone
                )
                db.register("buckets", pa.table({"start": starts}))
            rows = db.execute(text, params).fetchall()
        return InsightAnswer(query.columns, rows, provisional=False, watermark=None)


class _Snapshot:
    """The warehouse as the insight routes see it: only its snapshot, for cache keys."""

    def snapshot(self) -> tuple[int, int, int | None]:
        return 1, 1, None


class _NoIngest:
    async def commit(self, groups: dict[int, Any]) -> None:
        raise AssertionError("the dashboard ingests nothing")


class _NoTokens:
    def active(self) -> list[TokenRecord]:
        return []


def _app(insights: Insights, authorizer: Authorizer | None = None) -> FastAPI:
    app = create_app(
        settings=Settings(**SETTINGS),
        shard_map=ShardMap.round_robin(2, 1),
        ingest=_NoIngest(),
        warehouse=_Snapshot(),  # type: ignore[arg-type]  # the page asks insights only
        admin=FakeAdmin(),
        cache=MemoryCache(),
        insights=insights,
        authorizer=authorizer,
    )
    return app


@contextmanager
def _serving(app: FastAPI) -> Iterator[str]:
    """The app's URL, served by uvicorn in a thread of this process."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: the dashboard tests need a real Chromium")
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, f"uvicorn not serving after {SERVER_START_S} s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SERVER_START_S)


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    with _serving(_app(FactsInsights(FACTS))) as url:
        yield url


# --------------------------------------------------------------------------- the DOM


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    own_text: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(" ".join([*self.own_text, *(c.text for c in self.children)]).split())

    def all(self, tag: str) -> list[Node]:
        """Descendants with this tag, in document order."""
        return [n for n in self._walk() if n.tag == tag and n is not self]

    def by_id(self, ident: str) -> Node:
        for node in self._walk():
            if node.attrs.get("id") == ident:
                return node
        raise AssertionError(f"no #{ident} in the page")

    def _walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child._walk()


class _Tree(HTMLParser):
    VOID = frozenset({"input", "meta", "br", "img", "link", "hr", "col", "source"})

    def __init__(self) -> None:
        super().__init__()
        self.root = Node("#root", {})
        self._open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self._open[-1].children.append(node)
        if tag not in self.VOID:
            self._open.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].own_text.append(data)


def _page(served: str, fragment: str = "", **query: str) -> str:
    params = {
        "site": SITE,
        "start": DAY.strftime("%Y-%m-%dT%H:%M"),
        "end": (DAY + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"),
        "interval": "hour",
        "tz": "UTC",
        **query,
    }
    return f"{served}/?{urlencode(params)}{fragment}"


def _dom(url: str, profile: Path) -> Node:
    tree = _Tree()
    tree.feed(_run_chromium(CHROMIUM, profile, "--dump-dom", url).stdout)
    page = tree.root
    message = page.by_id("msg").text
    assert message == "", f"the page says {message!r}"
    assert "data-points" in page.by_id("chart").attrs, "the chart was not drawn"
    return page


def _rows(page: Node, table: str) -> list[tuple[str, int, int]]:
    """(value, visitors, pageviews) of each row of a top table, from its data."""
    body = page.by_id(table).all("tbody")[0]
    return [
        (r.attrs["data-value"], int(r.attrs["data-visitors"]), int(r.attrs["data-pageviews"]))
        for r in body.all("tr")
    ]


def _totals(page: Node) -> dict[str, tuple[str, str]]:
    """Each metric's headline and its change (percent, "" for none)."""
    return {
        m: (page.by_id(f"total-{m}").text, page.by_id(f"change-{m}").attrs["data-change"])
        for m in model.METRICS
    }


def _chart_numbers(page: Node) -> dict[str, tuple[str, str]]:
    """The chart's buckets with any traffic: bucket start -> (visitors, pageviews)."""
    rows = page.by_id("chart-data").all("tbody")[0].all("tr")
    cells = {r.attrs["data-t"]: tuple(c.text for c in r.all("td")) for r in rows}
    assert len(cells) == 24, f"a day of hours, not {len(cells)} buckets"
    return {t: (v, p) for t, (v, p) in cells.items() if (v, p) != ("0", "0")}


def _filter_link(dimension: str, value: str) -> str:
    return "#" + urlencode([("filter", f"{dimension}:is:{value}")])


# --------------------------------------------------------------------------- tests


def test_the_api_answers_the_facts(served: str) -> None:
    """What the page will show, from the API first, so a page failure is the page's."""
    window = {"start": "2024-05-01T00:00", "end": "2024-05-02T00:00", "tz": "UTC"}
    with httpx.Client(base_url=served, timeout=30) as client:
        totals = client.get(
            f"/v1/sites/{SITE}/totals", params={**window, "compare": "previous_period"}
        )
        pages = client.get(f"/v1/sites/{SITE}/breakdown", params={**window, "by": "path"})
    assert totals.status_code == 200, totals.text
    assert totals.json()["metrics"] == {"visitors": 4, "pageviews": 10, "events": 1}
    assert totals.json()["previous"] == {"visitors": 2, "pageviews": 3, "events": 0}
    assert pages.status_code == 200, pages.text
    assert [(r["value"], r["visitors"]) for r in pages.json()["results"]] == [
        ("/pricing", 3),
        ("/", 2),
        ("/blog", 1),
    ]


def test_the_page_shows_totals_chart_and_tables(served: str, tmp_path: Path) -> None:
    page = _dom(_page(served), tmp_path / "profile")
    assert _totals(page) == {
        "visitors": ("4", "100"),
        "pageviews": ("10", "233.3"),
        "events": ("1", ""),
    }
    assert page.by_id("change-visitors").text == "+100.0% vs previous period"
    assert page.by_id("change-events").text == "none in previous period"
    chart = page.by_id("chart").attrs
    assert (chart["data-points"], chart["data-total"]) == ("24", "10")
    assert (chart["data-series"], chart["data-mode"]) == ("pageviews,visitors", "grouped")
    assert _chart_numbers(page) == {
        "2024-05-01T10:00:00+00:00": ("2", "4"),
        "2024-05-01T11:00:00+00:00": ("1", "3"),
        "2024-05-01T14:00:00+00:00": ("1", "3"),
    }
    assert _rows(page, "by-path") == [("/pricing", 3, 3), ("/", 2, 6), ("/blog", 1, 1)]
    assert _rows(page, "by-source") == [
        ("google.com", 2, 4),
        ("", 1, 3),
        (HN, 1, 3),
    ]
    assert page.by_id("by-tech").attrs["data-by"] == "device"
    assert _rows(page, "by-tech") == [("Desktop", 2, 8), ("Mobile", 2, 2)]
    assert page.by_id("by-source").all("tbody")[0].all("a")[1].text == "(direct or none)"
    assert page.by_id("filters").all("span")[0].attrs.get("hidden") is None  # the hint
    # Each row is a link (focusable, shareable) to the view filtered by its value.
    for table, dimension in (("by-path", "path"), ("by-source", "source"), ("by-tech", "device")):
        for row in page.by_id(table).all("tbody")[0].all("tr"):
            (link,) = row.all("a")
            assert link.attrs["href"] == _filter_link(dimension, row.attrs["data-value"])


def test_a_clicked_page_row_filters_everything(served: str, tmp_path: Path) -> None:
    first = _dom(_page(served), tmp_path / "profile-all")
    pricing = next(
        r for r in first.by_id("by-path").all("tr") if r.attrs.get("data-value") == "/pricing"
    )
    href = pricing.all("a")[0].attrs["href"]
    assert href == "#filter=path%3Ais%3A%2Fpricing"

    page = _dom(_page(served, href), tmp_path / "profile-filtered")
    assert _totals(page) == {
        "visitors": ("3", "200"),
        "pageviews": ("3", "200"),
        "events": ("1", ""),
    }
    assert _chart_numbers(page) == {
        "2024-05-01T10:00:00+00:00": ("2", "3"),
        "2024-05-01T11:00:00+00:00": ("1", "0"),
    }
    assert _rows(page, "by-path") == [("/pricing", 3, 3)]
    assert _rows(page, "by-source") == [
        ("", 1, 1),
        ("google.com", 1, 2),
        (HN, 1, 0),
    ]
    assert _rows(page, "by-tech") == [("Desktop", 2, 2), ("Mobile", 1, 1)]
    # The active filter is a chip; its link removes it; another row's link adds to it.
    (chip,) = [s for s in page.by_id("filters").all("span") if s.attrs.get("class") == "chip"]
    assert chip.attrs["data-filter"] == "path:is:/pricing"
    assert chip.text.startswith("Page is /pricing")
    (remove,) = chip.all("a")
    assert remove.attrs["href"] == "#"
    assert remove.attrs["aria-label"] == "Remove the filter Page is /pricing"
    google = page.by_id("by-source").all("tbody")[0].all("a")[1]
    both = [("filter", "path:is:/pricing"), ("filter", "source:is:google.com")]
    assert google.attrs["href"] == "#" + urlencode(both)


def test_the_switch_shows_browsers(served: str, tmp_path: Path) -> None:
    page = _dom(_page(served, "#tech=browser"), tmp_path / "profile")
    assert page.by_id("by-tech").attrs["data-by"] == "browser"
    assert page.by_id("h-tech").text == "Browsers"
    assert _rows(page, "by-tech") == [("Chrome", 2, 6), ("Firefox", 1, 3), ("Safari", 1, 1)]
    chrome = page.by_id("by-tech").all("tbody")[0].all("a")[0]
    assert chrome.attrs["href"] == "#" + urlencode(
        [("filter", "browser:is:Chrome"), ("tech", "browser")]
    )
    links = {a.attrs["data-tech"]: a.attrs for a in page.by_id("tech-switch").all("a")}
    assert links["browser"].get("aria-current") == "true"
    assert links["os"]["href"] == "#tech=os" and links["device"]["href"] == "#"


def test_the_chart_draws_both_series(served: str, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-insights.png"
    shot.unlink(missing_ok=True)
    _run_chromium(
        CHROMIUM,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1200,800",
        "--hide-scrollbars",
        _page(served),
    )
    assert shot.exists(), "chromium wrote no screenshot"
    rows = _rgba_rows(shot.read_bytes())
    pageviews, visitors = _bars(rows, PAGEVIEWS_RGB), _bars(rows, VISITORS_RGB)
    assert len(pageviews) == 3 and len(visitors) == 3, (pageviews, visitors, shot)
    # One scale for both: 4 pageviews (10:00) is the tallest bar.
    full = max(pageviews)
    for height, value in zip([*pageviews, *visitors], [4, 3, 3, 2, 1, 1], strict=True):
        assert abs(height - full * value / 4) <= 2, (pageviews, visitors)


def test_a_guarded_cluster_asks_for_a_token(tmp_path: Path) -> None:
    """Insights need a read token as the traffic series does; the page asks for one."""
    guarded = Authorizer(_NoTokens(), mode="on")
    with _serving(_app(FactsInsights(FACTS), guarded)) as url:
        tree = _Tree()
        tree.feed(_run_chromium(CHROMIUM, tmp_path / "profile", "--dump-dom", _page(url)).stdout)
    page = tree.root
    assert "hidden" not in page.by_id("auth").attrs, "the token form must show"
    assert page.by_id("auth-why").text == "This data needs an access token."
    assert page.by_id("msg").text != ""
    assert page.by_id("total-visitors").text == "\u2013"
