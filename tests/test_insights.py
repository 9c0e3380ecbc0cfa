"""Insights on a real cluster: visitors, pageviews, events, breakdowns and filters, live
and after processing, in several time zones, against counts made here; the
Plausible-compatible query; re-processing's diff of the new metrics."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from flowray.cluster import control as cluster
from tests.helpers import cluster_settings, running_cluster

SITE = "insight.example"
T0 = int(datetime(2026, 11, 28, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
DAY_MS = 86_400_000
CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"
)
BOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
PATHS = ["/", "/pricing", "/blog/a", "/blog/b?utm_source=newsletter&utm_medium=email"]
REFERRERS = [None, "https://www.google.com/search?q=x", "https://news.ycombinator.com/"]
ZONES = ["UTC", "Asia/Kolkata", "America/New_York"]
MODULE = "tests.logic_bots"
SETTLE_S = 15.0


def make_events(n: int) -> list[dict[str, Any]]:
    """Events over three days from 40 visitors, so most visitors come back on several
    days and in several hours: counting one twice would show."""
    rng = random.Random(21)
    out = []
    for i in range(n):
        out.append(
            {
                "ts": T0 + rng.randrange(3 * DAY_MS),
                "site": SITE,
                "path": rng.choice(PATHS),
                "referrer": rng.choice(REFERRERS),
                "ua": rng.choice([CHROME, CHROME, IPHONE, BOT]),
                "visitor": f"v{rng.randrange(40)}",
                "name": "Signup" if rng.random() < 0.1 else None,
                "id": f"e{i}",
            }
        )
    return out


def _path(raw: str) -> str:
    return raw.partition("?")[0]


def expected(
    events: list[dict[str, Any]], zone: str, keep: Any = lambda e: True
) -> dict[str, dict[str, Any]]:
    """Per local day: pageviews, events and the set of visitors, counted here."""
    days: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"pageviews": 0, "events": 0, "visitors": set()}
    )
    for e in events:
        if not keep(e):
            continue
        local = datetime.fromtimestamp(e["ts"] / 1000, ZoneInfo(zone)).date().isoformat()
        day = days[local]
        day["events" if e["name"] else "pageviews"] += 1
        day["visitors"].add(e["visitor"])
    return days


@pytest.fixture(scope="module")
def loaded(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str, list[dict[str, Any]]]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("insights"),
        serve_port,
        redis_url,
        "flowray-insights",
        logic_modules=MODULE,
    )
    events = make_events(3000)
    with running_cluster(settings) as (running, url):
        with httpx.Client(base_url=url, timeout=60) as client:
            for lo in range(0, len(events), 500):
                answer = client.post("/v1/events", json=events[lo : lo + 500])
                assert answer.status_code == 200, answer.text
            # A retry of an acknowledged batch: ids make it count once.
            assert client.post("/v1/events", json=events[:100]).status_code == 200
        yield running, url, events


def _series(client: httpx.Client, zone: str, *filters: str) -> dict[str, dict[str, int]]:
    params: dict[str, Any] = {
        "start": "2026-11-27",
        "end": "2026-12-02",
        "interval": "day",
        "tz": zone,
        "filter": list(filters),
    }
    answer = client.get(f"/v1/sites/{SITE}/timeseries", params=params)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return {
        p["t"][:10]: {m: p[m] for m in ("visitors", "pageviews", "events")}
        for p in body["points"]
        if p["pageviews"] or p["events"]
    }


def _as_counts(days: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {
        d: {"visitors": len(v["visitors"]), "pageviews": v["pageviews"], "events": v["events"]}
        for d, v in sorted(days.items())
    }


def _settle(client: httpx.Client, events: list[dict[str, Any]]) -> None:
    """Wait (bounded) until the live counts hold every acknowledged event: a master
    counts newly committed entries within about a second."""
    params = {"start": "2026-11-28", "end": "2026-12-01", "compare": "none"}
    deadline = time.monotonic() + SETTLE_S
    while True:
        body = client.get(f"/v1/sites/{SITE}/totals", params=params).json()
        if body["metrics"]["pageviews"] + body["metrics"]["events"] == len(events):
            return
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def _check_everything(client: httpx.Client, events: list[dict[str, Any]]) -> None:
    _settle(client, events)
    for zone in ZONES:
        assert _series(client, zone) == _as_counts(expected(events, zone)), zone
    # A filter on a dimension, and one on the event name.
    pricing = _series(client, "Asia/Kolkata", "path:is:/pricing")
    assert pricing == _as_counts(
        expected(events, "Asia/Kolkata", lambda e: _path(e["path"]) == "/pricing")
    )
    blog = _series(client, "UTC", "path:contains:/blog", "device:is_not:bot")
    assert blog == _as_counts(
        expected(events, "UTC", lambda e: "/blog" in e["path"] and e["ua"] != BOT)
    )
    # Totals over the three days: the same visitor once, whichever days it came.
    params = {"start": "2026-11-28", "end": "2026-12-01", "tz": "UTC"}
    totals = client.get(f"/v1/sites/{SITE}/totals", params=params).json()
    assert totals["metrics"] == {
        "visitors": len({e["visitor"] for e in events}),
        "pageviews": sum(1 for e in events if not e["name"]),
        "events": sum(1 for e in events if e["name"]),
    }
    assert totals["previous"] == {"visitors": 0, "pageviews": 0, "events": 0}
    # Top pages by visitors, with pagination.
    by_path: dict[str, set[str]] = defaultdict(set)
    for e in events:
        by_path[_path(e["path"])].add(e["visitor"])
    want = sorted(((-len(v), p) for p, v in by_path.items()))
    pages = []
    for page in (1, 2):
        body = client.get(
            f"/v1/sites/{SITE}/breakdown",
            params={**params, "by": "path", "limit": 2, "page": page},
        ).json()
        pages += [(-r["visitors"], r["value"]) for r in body["results"]]
    assert pages == want
    sources = client.get(f"/v1/sites/{SITE}/breakdown", params={**params, "by": "source"}).json()
    assert {r["value"] for r in sources["results"]} == {
        "",
        "google.com",
        "news.ycombinator.com",
        "newsletter",
    }
    names = client.get(f"/v1/sites/{SITE}/breakdown", params={**params, "by": "name"}).json()
    assert {r["value"]: r["events"] for r in names["results"]} == {
        "pageview": 0,
        "Signup": sum(1 for e in events if e["name"]),
    }


def test_live_then_processed_answers_match_counts_made_here(
    loaded: tuple[cluster.Cluster, str, list[dict[str, Any]]],
) -> None:
    _running, url, events = loaded
    with httpx.Client(base_url=url, timeout=60) as client:
        _check_everything(client, events)  # live: nothing processed yet
        assert client.post("/v1/admin/process", params={"mode": "all"}).status_code == 200
        _check_everything(client, events)  # from the warehouse


def test_plausible_query_answers_match_counts_made_here(
    loaded: tuple[cluster.Cluster, str, list[dict[str, Any]]],
) -> None:
    _running, url, events = loaded
    body = {
        "site_id": SITE,
        "metrics": ["visitors", "pageviews", "events"],
        "date_range": ["2026-11-28", "2026-11-30"],
        "dimensions": ["time:day"],
    }
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/api/v2/query", json=body)
        assert answer.status_code == 200, answer.text
        got = {r["dimensions"][0][:10]: r["metrics"] for r in answer.json()["results"]}
        want = {
            d: [c["visitors"], c["pageviews"], c["events"]]
            for d, c in _as_counts(expected(events, "UTC")).items()
        }
        assert got == want
        bad = client.post("/api/v2/query", json={**body, "metrics": ["bounce_rate"]})
        assert bad.status_code == 400 and "bounce_rate" in bad.text


def test_reprocessing_reports_the_new_metrics_and_rolls_back(
    loaded: tuple[cluster.Cluster, str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _running, url, events = loaded
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/v1/admin/process", params={"mode": "all"})
        body = {"start": "2026-11-28", "end": "2026-12-01", "logic": "no-bots"}
        started = client.post("/v1/admin/reprocess", json=body)
        result = _wait_job(client, started)
        (change,) = [c for c in result["changes"] if c["site"] == SITE]
        humans = [e for e in events if e["ua"] != BOT]
        assert (change["before"], change["after"]) == (len(events), len(humans))
        assert change["custom_after"] == sum(1 for e in humans if e["name"])
        assert change["visitors_after"] <= change["visitors_before"]
        for zone in ZONES[:2]:
            want = _as_counts(expected(events, zone, lambda e: e["ua"] != BOT))
            assert _series(client, zone) == want
        _wait_job(client, client.post("/v1/admin/rollback", json={}))
        assert _series(client, "UTC") == _as_counts(expected(events, "UTC"))


def _wait_job(client: httpx.Client, started: httpx.Response) -> dict[str, Any]:
    from tests.test_reprocess import wait_job

    return wait_job(client, started)
