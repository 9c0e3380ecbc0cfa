"""Web tracking end to end: the official Plausible tracker in a real Chromium, a real
cluster behind ``POST /api/event``.

The test page (tests/tracker_page/) loads @plausible-analytics/tracker unchanged, out
of its npm tarball pinned by integrity hash, from a local origin of its own (another
loopback port, under host names that Chromium maps to loopback), so every event is a
cross-origin request and CORS is exercised for real. Each load sends a page view and,
once loaded, a "Signup" custom event; the page records what the tracker sent and what
the endpoint answered, which the test reads from the DOM Chromium dumps.

The loads differ in path, UTM parameters, referrer and User-Agent, and the counts are
then read back through the API: page views, custom events, visitors, and the path and
source dimensions.

A first test drives the same page against a stand-in endpoint, without Ray, so that a
failure of the cluster test is known to be flowray's, not the page's or the browser's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from flowray.cluster import control as cluster
from tests.helpers import cluster_settings, running_cluster
from tests.ports import free_port
from tests.tracker_page import package
from tests.tracker_page.api import (
    INSIGHT_ROUTES,
    TRACKER_ROUTES,
    poll,
    register_site,
    require_routes,
    wait_until_known,
)
from tests.tracker_page.origin import Origin, serving, site_pages

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT_S = 120
COUNTS_TIMEOUT_S = 60.0
KNOWN_TIMEOUT_S = 30.0
SITE = "tracked.example"  # the registered site; the page is served under this name
REFERRING_HOST = "news.example"  # serves go.html, which links to the tracked page
PAGE_PATHS = ("/", "/pricing")
# Two ordinary desktop browsers: headless Chromium's own User-Agent names
# HeadlessChrome, which flowray rightly counts as a bot, not a visitor.
UA_LINUX_CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
UA_MAC_FIREFOX = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14.5; rv:127.0) Gecko/20100101 Firefox/127.0"
)


@dataclass(frozen=True)
class Load:
    """One page load: the tracked page at ``path`` with ``query``, reached through the
    referring site's go.html when ``referred``, in a browser sending ``ua``."""

    path: str
    query: str = ""
    referred: bool = False
    ua: str = UA_LINUX_CHROME

    def page_url(self, port: int) -> str:
        return f"http://{SITE}:{port}{self.path}" + (f"?{self.query}" if self.query else "")

    def open_url(self, port: int) -> str:
        if not self.referred:
            return self.page_url(port)
        return f"http://{REFERRING_HOST}:{port}/go.html?to={quote(self.page_url(port), safe='')}"


LOADS = (
    Load("/"),
    Load("/pricing", "utm_source=newsletter&utm_medium=email&utm_campaign=spring&plan=pro"),
    Load("/pricing", referred=True),
    Load("/", ua=UA_MAC_FIREFOX),
)
# What LOADS must add up to.
PAGEVIEWS_BY_PATH = {"/": 2, "/pricing": 2}
PAGEVIEWS_BY_SOURCE = {"": 2, "newsletter": 1, REFERRING_HOST: 1}
VISITORS = 2  # one per User-Agent: one address, one day, one site


# --------------------------------------------------------------------------- package


def test_the_vendored_tracker_is_the_one_npm_published() -> None:
    """The tarball hashes to the integrity npm gave for the pinned version (package.load
    checks it), and its license is kept beside it as published."""
    tracker = package.load()
    lock = json.loads(package.LOCK.read_text())
    assert (lock["package"], lock["version"]) == ("@plausible-analytics/tracker", tracker.version)
    assert (
        tracker.integrity
        == lock["integrity"]
        == package.integrity((package.VENDOR / lock["tarball"]).read_bytes())
    )
    assert json.loads(tracker.files["package.json"])["version"] == tracker.version
    assert (package.VENDOR / "LICENSE.md").read_bytes() == tracker.files["LICENSE.md"]
    assert b"MIT License" in tracker.files["LICENSE.md"]


def test_a_changed_tarball_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = json.loads(package.LOCK.read_text())
    data = bytearray((package.VENDOR / lock["tarball"]).read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / lock["tarball"]).write_bytes(bytes(data))
    (tmp_path / "tracker.lock.json").write_text(json.dumps(lock))
    monkeypatch.setattr(package, "VENDOR", tmp_path)
    monkeypatch.setattr(package, "LOCK", tmp_path / "tracker.lock.json")
    with pytest.raises(package.PackageError, match="the lock pins"):
        package.load()


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: the tracker test needs a real Chromium. Run the suite "
            "with scripts/test as root (it installs it) or: apt-get install -y chromium"
        )
    return CHROMIUM


@dataclass(frozen=True)
class Seen:
    """What the page recorded: each request the tracker sent (name, url, referrer,
    domain, props) and each answer its callback saw (status or error)."""

    sent: list[dict[str, str]]
    answers: list[dict[str, str]]


class _Lists(HTMLParser):
    """The data-* attributes of the items of the page's two lists, #sent and #answers."""

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[str, list[dict[str, str]]] = {"sent": [], "answers": []}
        self._list: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "ol" and values.get("id") in self.items:
            self._list = values["id"]
        elif tag == "li" and self._list is not None:
            fields = {k.removeprefix("data-"): v for k, v in values.items()}
            self.items[self._list].append(fields)

    def handle_endtag(self, tag: str) -> None:
        if tag == "ol":
            self._list = None


def open_page(chromium: Path, profile: Path, load: Load, port: int) -> Seen:
    """Load the page once in headless Chromium and return what it recorded.

    --host-resolver-rules maps the site's and the referring site's names to loopback,
    so the page runs under its real host name (the tracker ignores localhost) and a
    referrer from another site is an ordinary cross-origin navigation.
    """
    command = [
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--user-agent={load.ua}",
        f"--host-resolver-rules=MAP {SITE} 127.0.0.1, MAP {REFERRING_HOST} 127.0.0.1",
        "--virtual-time-budget=10000",
        "--dump-dom",
        load.open_url(port),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    lists = _Lists()
    lists.feed(done.stdout)
    return Seen(lists.items["sent"], lists.items["answers"])


def check_sent(seen: Seen, load: Load, port: int) -> None:
    """The tracker sent one page view and one Signup for ``load``, as the page intends,
    and its callback saw the Signup answered 202 (a readable answer: CORS allowed it)."""
    names = [item.get("name") for item in seen.sent]
    assert names == ["pageview", "Signup"], f"the tracker sent {seen.sent}"
    referrer = f"http://{REFERRING_HOST}:{port}/" if load.referred else ""
    for item in seen.sent:
        assert item["url"] == load.page_url(port), seen.sent
        assert item["referrer"] == referrer, seen.sent
        assert item["domain"] == SITE, seen.sent
    plan = "pro" if "plan=pro" in load.query else "free"
    assert seen.sent[1]["props"] == f'{{"plan":"{plan}"}}', seen.sent
    assert seen.answers == [{"event": "Signup", "status": "202"}], (
        f"the Signup's answer, as the page saw it: {seen.answers}"
    )


def test_the_page_tracks_across_origins_against_a_stand_in(chromium: Path, tmp_path: Path) -> None:
    """Without flowray: the page, the pinned tracker and Chromium do what the cluster test
    relies on, against an endpoint that records each request and answers 202 with CORS."""
    endpoint = Origin(free_port(), pages={}, events=[])
    config = {"domain": SITE, "endpoint": f"http://127.0.0.1:{endpoint.port}/api/event"}
    site = Origin(free_port(), site_pages(config, PAGE_PATHS))
    with serving(endpoint), serving(site):
        for load in LOADS:
            check_sent(open_page(chromium, tmp_path / "profile", load, site.port), load, site.port)
    assert ("GET", f"{SITE}:{site.port}", "/vendor/plausible.js") in site.requests
    assert ("GET", f"{REFERRING_HOST}:{site.port}", "/go.html") in site.requests
    assert endpoint.events is not None
    # The tracker also reports engagement (time on page, scroll depth) when a page is
    # left, which a closing headless browser may or may not get to send: at most one per
    # load, never counted as a page view or a custom event.
    tracked = [e for e in endpoint.events if e["body"]["n"] != "engagement"]
    engagement = [e["body"]["u"] for e in endpoint.events if e["body"]["n"] == "engagement"]
    assert len(engagement) <= len(LOADS)
    assert set(engagement) <= {load.page_url(site.port) for load in LOADS}
    assert len(tracked) == 2 * len(LOADS), [(e["body"]["n"], e["body"]["u"]) for e in tracked]
    # Loads run one after another; within one the tracker sends the page view and the
    # custom event at once, so those two may arrive in either order.
    pairs = [tracked[i : i + 2] for i in range(0, len(tracked), 2)]
    for pair, load in zip(pairs, LOADS, strict=True):
        assert sorted(e["body"]["n"] for e in pair) == ["Signup", "pageview"]
        assert [e["body"]["u"] for e in pair] == [load.page_url(site.port)] * 2
    for event, load in zip(tracked, [load for load in LOADS for _ in (1, 2)], strict=True):
        headers = {k.lower(): v for k, v in event["headers"].items()}
        assert headers["origin"] == f"http://{SITE}:{site.port}"  # a cross-origin request
        assert headers["content-type"] == "text/plain"  # a simple request: no preflight
        assert headers["user-agent"] == load.ua
        assert event["body"]["d"] == SITE


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class Tracked:
    """LOADS done against a cluster: its URL, the page's port, and when they ran."""

    url: str
    page_port: int
    started: datetime
    finished: datetime

    def window(self) -> dict[str, str]:
        """Whole UTC hours around the loads, as the query routes take a range."""
        start = self.started.replace(minute=0, second=0, microsecond=0)
        end = self.finished.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        return {"start": start.isoformat(), "end": end.isoformat()}

    def visitors_note(self) -> str:
        """Visitor ids change with the UTC day (a new salt): loads on both sides of
        midnight are twice the visitors."""
        if self.started.date() == self.finished.date():
            return "one UTC day: one visitor per User-Agent"
        return "the loads crossed UTC midnight: each browser counts once per day"


@pytest.fixture(scope="module")
def tracker_cluster(
    chromium: Path,
    ray_session: None,
    redis_url: str,
    serve_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("tracker"), serve_port, redis_url, "flowray-tracker"
    )
    with running_cluster(settings) as running:
        yield running


@pytest.fixture(scope="module")
def tracked(
    chromium: Path,
    tracker_cluster: tuple[cluster.Cluster, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Tracked:
    """SITE registered, then LOADS opened one after another in one browser profile,
    each checked as the page saw it (sent, and answered 202 across origins)."""
    _running, url = tracker_cluster
    with httpx.Client(base_url=url, timeout=60) as client:
        require_routes(client, TRACKER_ROUTES)
        register_site(client, SITE)
        wait_until_known(client, SITE, KNOWN_TIMEOUT_S)
    config = {"domain": SITE, "endpoint": f"{url}/api/event"}
    site = Origin(free_port(), site_pages(config, PAGE_PATHS))
    profile = tmp_path_factory.mktemp("tracker-profile")
    started = datetime.now(UTC)
    with serving(site):
        for load in LOADS:
            check_sent(open_page(chromium, profile, load, site.port), load, site.port)
    return Tracked(url, site.port, started, datetime.now(UTC))


@pytest.mark.ray
def test_every_load_is_counted(tracked: Tracked) -> None:
    """The traffic series counts every event the tracker sent: a page view and a Signup
    per load (the engagement events a closing page sends are dropped, not counted)."""
    params = {**tracked.window(), "interval": "hour"}
    with httpx.Client(base_url=tracked.url, timeout=60) as client:

        def total() -> int:
            answer = client.get(f"/v1/sites/{SITE}/traffic", params=params)
            assert answer.status_code == 200, answer.text
            return sum(int(p["count"]) for p in answer.json()["points"])

        want = 2 * len(LOADS)
        assert poll(total, lambda n: n >= want, COUNTS_TIMEOUT_S) == want
        processed = client.post("/v1/admin/process", params={"mode": "all"})
        assert processed.status_code == 200, processed.text
        assert total() == want, "processing must not change the count"


@pytest.mark.ray
def test_insights_count_pageviews_events_visitors_paths_and_sources(tracked: Tracked) -> None:
    """The insight routes, live and once processed: LOADS' page views and Signups,
    their visitors, and the path, source, UTM, browser and name dimensions."""
    with httpx.Client(base_url=tracked.url, timeout=60) as client:
        require_routes(client, INSIGHT_ROUTES)
        want = {"visitors": VISITORS, "pageviews": len(LOADS), "events": len(LOADS)}
        live = poll(lambda: totals(client, tracked), lambda got: got == want, COUNTS_TIMEOUT_S)
        assert live == want, tracked.visitors_note()
        check_insights(client, tracked)
        processed = client.post("/v1/admin/process", params={"mode": "all"})
        assert processed.status_code == 200, processed.text
        check_insights(client, tracked)


def totals(client: httpx.Client, tracked: Tracked, *filters: str) -> dict[str, int]:
    answer = client.get(
        f"/v1/sites/{SITE}/totals",
        params={**tracked.window(), "metrics": "visitors,pageviews,events", "filter": filters},
    )
    assert answer.status_code == 200, answer.text
    return {k: int(v) for k, v in answer.json()["metrics"].items()}


def breakdown(client: httpx.Client, tracked: Tracked, by: str) -> dict[str, dict[str, int]]:
    """Every value of dimension ``by`` with its metrics (one page holds them all here)."""
    answer = client.get(
        f"/v1/sites/{SITE}/breakdown",
        params={**tracked.window(), "by": by, "metrics": "visitors,pageviews,events"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["has_more"] is False, body
    return {
        row["value"]: {m: int(row[m]) for m in ("visitors", "pageviews", "events")}
        for row in body["results"]
    }


def check_insights(client: httpx.Client, tracked: Tracked) -> None:
    want = {"visitors": VISITORS, "pageviews": len(LOADS), "events": len(LOADS)}
    assert totals(client, tracked) == want, tracked.visitors_note()
    series = client.get(
        f"/v1/sites/{SITE}/timeseries",
        params={**tracked.window(), "interval": "hour", "metrics": "pageviews,events"},
    )
    assert series.status_code == 200, series.text
    points = series.json()["points"]
    assert sum(p["pageviews"] for p in points) == len(LOADS), points
    assert sum(p["events"] for p in points) == len(LOADS), points

    by_path = breakdown(client, tracked, "path")
    assert {path: row["pageviews"] for path, row in by_path.items()} == PAGEVIEWS_BY_PATH
    assert {path: row["events"] for path, row in by_path.items()} == PAGEVIEWS_BY_PATH
    by_source = breakdown(client, tracked, "source")
    assert {s: row["pageviews"] for s, row in by_source.items()} == PAGEVIEWS_BY_SOURCE
    assert by_source[""]["visitors"] == 2  # the first and the last load: two browsers
    assert {v: r["pageviews"] for v, r in breakdown(client, tracked, "utm_medium").items()} == {
        "": 3,
        "email": 1,
    }
    assert {v: r["pageviews"] for v, r in breakdown(client, tracked, "utm_campaign").items()} == {
        "": 3,
        "spring": 1,
    }
    by_name = breakdown(client, tracked, "name")
    assert by_name == {
        "pageview": {"visitors": VISITORS, "pageviews": len(LOADS), "events": 0},
        "Signup": {"visitors": VISITORS, "pageviews": 0, "events": len(LOADS)},
    }, "engagement events must not be counted"
    by_browser = breakdown(client, tracked, "browser")
    assert {b: (r["visitors"], r["pageviews"]) for b, r in by_browser.items()} == {
        "Chrome": (1, 3),
        "Firefox": (1, 1),
    }
    # A filter: the page /pricing had two views, by one visitor.
    assert totals(client, tracked, "path:is:/pricing") == {
        "visitors": 1,
        "pageviews": 2,
        "events": 2,
    }
