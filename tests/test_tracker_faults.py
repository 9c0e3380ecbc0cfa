"""Tracker traffic through a master's death: kill -9 the master of the site's group
while several senders post tracker events to ``POST /api/event`` on both fronts.

Tracker events carry no ids, so flowray cannot drop a resent copy: an event answered
202 must be counted exactly once, and one whose outcome the sender never learnt (503,
a broken connection) may count once or not at all (see docs/architecture.md, "What is
guaranteed"). Every event has a path of its own, so the counts can be checked event by
event where the breakdown by path is served, and as bounds on the total everywhere.

The senders write as browsers behind a proxy do: each event from an address of its
own, in X-Forwarded-For from a trusted proxy (loopback), with a browser's User-Agent.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from flowray.cluster import control as cluster
from flowray.core.router import ShardMap
from tests.helpers import cluster_settings, kill9, replica_pid, running_cluster
from tests.tracker_page.api import (
    INSIGHT_ROUTES,
    TRACKER_ROUTES,
    poll,
    register_site,
    require_routes,
    send_event,
    tracker_event,
    wait_until_known,
)

SITE = "faults.example"
SENDERS = 4
GROUPS, SHARDS = 2, 4
ACKED_BEFORE_KILL = 300  # events answered 202 before the kill, across senders
ACKED_AFTER_KILL = 300  # and after it, so writes are known to have resumed
PHASE_TIMEOUT_S = 120.0
COUNTS_TIMEOUT_S = 60.0
BREAKDOWN_LIMIT = 1000
BREAKDOWN_PAGES_MAX = 100
UNKNOWN_STATUSES = (0, 503)  # 0: the connection broke; the outcome is unknown


class Sender(threading.Thread):
    """Sends tracker page views, each once, each with a path and an address of its own,
    and files each under its answer."""

    def __init__(self, front: str, number: int) -> None:
        super().__init__(daemon=True)
        self.front, self.number = front, number
        self.acked: list[str] = []  # paths answered 202
        self.unknown: list[str] = []  # paths whose outcome is unknown
        self.statuses: Counter[int] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        with httpx.Client(base_url=self.front, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                path = f"/s{self.number}/{n}"
                address = f"10.{self.number}.{n // 250 % 250}.{n % 250 + 1}"
                body = tracker_event(SITE, f"https://{SITE}{path}")
                try:
                    status = send_event(client, body, forwarded_for=address).status_code
                except httpx.HTTPError:
                    status = 0
                with self.lock:
                    self.statuses[status] += 1
                    if status == 202:
                        self.acked.append(path)
                    elif status in UNKNOWN_STATUSES:
                        self.unknown.append(path)
                n += 1

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)


@dataclass(frozen=True)
class Outcome:
    url: str
    acked: list[str]
    unknown: list[str]
    statuses: Counter[int]
    started: datetime
    finished: datetime

    def window(self) -> dict[str, str]:
        start = self.started.replace(minute=0, second=0, microsecond=0)
        end = self.finished.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        return {"start": start.isoformat(), "end": end.isoformat()}


@pytest.fixture(scope="module")
def faults_cluster(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("tracker-faults"),
        serve_port,
        redis_url,
        "flowray-tracker-faults",
        groups=GROUPS,
        shards=SHARDS,
        commit_timeout_s=3.0,
        trusted_proxies="127.0.0.1,::1",
        event_rate_per_ip=1000.0,
        event_rate_per_site=100_000.0,
        sites_reload_s=0.2,
    )
    with running_cluster(settings) as running:
        yield running


def _total_acked(senders: list[Sender]) -> int:
    return sum(s.acked_count() for s in senders)


@pytest.fixture(scope="module")
def outcome(faults_cluster: tuple[cluster.Cluster, str]) -> Outcome:
    """The senders' work, with the master of SITE's group killed midway."""
    running, url = faults_cluster
    gateway = f"http://127.0.0.1:{running.settings.ingest_port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        require_routes(client, TRACKER_ROUTES)
        register_site(client, SITE)
        for front in (url, gateway):
            with httpx.Client(base_url=front, timeout=30) as probe:
                wait_until_known(probe, SITE, 30.0)
    group = ShardMap.round_robin(SHARDS, GROUPS).group_of_site(SITE)
    victim = replica_pid(url, group, "master")
    senders = [Sender((url, gateway)[n % 2], n) for n in range(SENDERS)]
    started = datetime.now(UTC)
    for sender in senders:
        sender.start()
    try:
        before = poll(
            lambda: _total_acked(senders), lambda n: n >= ACKED_BEFORE_KILL, PHASE_TIMEOUT_S
        )
        assert before >= ACKED_BEFORE_KILL, f"only {before} events acknowledged before the kill"
        kill9(victim)
        target = before + ACKED_AFTER_KILL
        after = poll(lambda: _total_acked(senders), lambda n: n >= target, PHASE_TIMEOUT_S)
        assert after >= target, f"writes did not resume after the kill: {after - before} acked"
    finally:
        for sender in senders:
            sender.stop.set()
        for sender in senders:
            sender.join(timeout=60)
    assert not any(s.is_alive() for s in senders), "a sender did not stop"
    new_master = replica_pid(url, group, "master")
    assert new_master != victim, "the killed master is master again: it was not killed"
    statuses: Counter[int] = sum((s.statuses for s in senders), Counter())
    unexpected = {k: v for k, v in statuses.items() if k not in (202, *UNKNOWN_STATUSES)}
    assert not unexpected, f"answers other than 202, 503 or a broken connection: {unexpected}"
    return Outcome(
        url,
        [p for s in senders for p in s.acked],
        [p for s in senders for p in s.unknown],
        statuses,
        started,
        datetime.now(UTC),
    )


def _traffic_total(client: httpx.Client, window: dict[str, str]) -> int:
    answer = client.get(f"/v1/sites/{SITE}/traffic", params={**window, "interval": "hour"})
    assert answer.status_code == 200, answer.text
    return sum(int(p["count"]) for p in answer.json()["points"])


def _within_bounds(total: int, outcome: Outcome) -> bool:
    return len(outcome.acked) <= total <= len(outcome.acked) + len(outcome.unknown)


@pytest.mark.ray
def test_acknowledged_events_survive_a_killed_master(outcome: Outcome) -> None:
    """Live, then processed: every 202 counted, nothing beyond the unknown ones."""
    window = outcome.window()
    bounds = (len(outcome.acked), len(outcome.acked) + len(outcome.unknown))
    with httpx.Client(base_url=outcome.url, timeout=600) as client:
        live = poll(
            lambda: _traffic_total(client, window),
            lambda n: _within_bounds(n, outcome),
            COUNTS_TIMEOUT_S,
        )
        assert _within_bounds(live, outcome), f"live: {live} counted, bounds {bounds}"
        processed = client.post("/v1/admin/process", params={"mode": "all"})
        assert processed.status_code == 200, processed.text
        total = _traffic_total(client, window)
    assert _within_bounds(total, outcome), f"processed: {total} counted, bounds {bounds}"
    assert total == live, "processing changed the count"


@pytest.mark.ray
def test_each_acknowledged_event_counts_once(outcome: Outcome) -> None:
    """Event by event, through the breakdown by path: each 202's path counted once, each
    unknown one at most once, and no path that was never sent."""
    with httpx.Client(base_url=outcome.url, timeout=600) as client:
        require_routes(client, INSIGHT_ROUTES)
        counts = breakdown_by_path(client, outcome.window())
    never_sent = set(counts) - set(outcome.acked) - set(outcome.unknown)
    assert not never_sent, f"paths counted that were never sent: {sorted(never_sent)[:10]}"
    lost = [p for p in outcome.acked if counts.get(p, 0) != 1]
    assert not lost, f"acknowledged events not counted exactly once: {lost[:10]}"
    twice = [p for p in outcome.unknown if counts.get(p, 0) > 1]
    assert not twice, f"unacknowledged events counted twice: {twice[:10]}"


def breakdown_by_path(client: httpx.Client, window: dict[str, str]) -> dict[str, int]:
    """Page views by path over ``window``, every row, a page of BREAKDOWN_LIMIT at a time."""
    counts: dict[str, int] = {}
    for page in range(1, BREAKDOWN_PAGES_MAX + 1):
        answer = client.get(
            f"/v1/sites/{SITE}/breakdown",
            params={
                **window,
                "by": "path",
                "metrics": "pageviews",
                "limit": BREAKDOWN_LIMIT,
                "page": page,
            },
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        for row in body["results"]:
            assert row["value"] not in counts, f"path {row['value']} on two pages"
            counts[row["value"]] = int(row["pageviews"])
        if not body["has_more"]:
            return counts
    raise AssertionError(f"more than {BREAKDOWN_PAGES_MAX} pages of paths")
