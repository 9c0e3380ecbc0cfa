"""Live counts: acknowledged events show in queries within seconds, marked provisional;
when their block is published, the published numbers equal what the live counts said
— also across a master's death (a new master rebuilds them from its log)."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.cluster import control as cluster
from flowray.ingest.events import EVENT_SCHEMA
from flowray.ingest.pieces import from_ipc, to_ipc
from flowray.query import live as live_module
from flowray.query.live import LiveCounts
from tests.helpers import cluster_settings, kill9, replica_pid, running_cluster

HOUR_MS = 3_600_000
SITES = [f"fresh{i}.example" for i in range(12)]


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def test_live_counts_follow_the_processing_rules() -> None:
    live = LiveCounts()
    key = (0, 100, 0)
    live.apply(
        key,
        _table(
            [
                {"ts": 100 * HOUR_MS + 5_000, "site": "a.com", "id": "x"},
                {"ts": 100 * HOUR_MS + 6_000, "site": "a.com", "id": "x"},  # duplicate id
                {"ts": 100 * HOUR_MS + 61_000, "site": "a.com"},
                {"ts": 100 * HOUR_MS + 61_000, "site": "b.com"},
            ]
        ),
    )
    # a late part of the same hour: its duplicate of id x is not counted again
    live.apply(
        (0, 100, 1),
        _table(
            [
                {"ts": 100 * HOUR_MS + 7_000, "site": "a.com", "id": "x"},
                {"ts": 100 * HOUR_MS + 8_000, "site": "a.com"},
            ]
        ),
    )
    minutes, counts = live.minutes("a.com", 0, 200 * HOUR_MS, published_upto=0)
    assert minutes.tolist() == [100 * HOUR_MS, 100 * HOUR_MS + 60_000]
    assert counts.tolist() == [2, 1]
    live.sealed(key, 7)
    live.published(7)
    assert live.minutes("a.com", 0, 200 * HOUR_MS, published_upto=7)[1].tolist() == [1]
    # A reader whose catalog predates the publish still sees the retired block once.
    assert live.minutes("a.com", 0, 200 * HOUR_MS, published_upto=0)[1].tolist() == [2, 1]
    live.published(9)
    assert live.minutes("a.com", 0, 200 * HOUR_MS, published_upto=0)[1].tolist() == [1]


def _all_minutes(live: LiveCounts, sites: list[str]) -> dict[str, list[tuple[int, int]]]:
    out = {}
    for site in sites:
        minutes, counts = live.minutes(site, 0, 200 * HOUR_MS, published_upto=0)
        out[site] = list(zip(minutes.tolist(), counts.tolist(), strict=True))
    return out


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_payloads_counted_together_count_as_one_by_one(seed: int) -> None:
    """What a master counts a block's payloads at a time equals counting each alone:
    duplicate ids across payloads, and across the parts of an hour, count once."""
    rng = random.Random(seed)
    sites = ["a.com", "b.com", "c.com"]
    payloads = []
    for _ in range(rng.randint(1, 6)):
        rows = [
            {
                "ts": 100 * HOUR_MS + rng.randrange(0, 5 * 60_000),
                "site": rng.choice(sites),
                "id": rng.choice([None, "x", "y", f"u{rng.random()}"]),
            }
            for _ in range(rng.randint(1, 20))
        ]
        payloads.append(to_ipc(_table(rows), compress=rng.random() < 0.5))
    cut = rng.randint(0, len(payloads))  # payloads before the cut are part 0, after part 1
    alone, together = LiveCounts(), LiveCounts()
    for i, payload in enumerate(payloads):
        alone.apply((0, 100, int(i >= cut)), from_ipc(payload))
    assert together.apply_payloads((0, 100, 0), payloads[:cut]) == []
    assert together.apply_payloads((0, 100, 1), payloads[cut:]) == []
    assert _all_minutes(together, sites) == _all_minutes(alone, sites)


@given(
    st.lists(
        st.tuples(st.sampled_from(["a.com", "b.com", "c.com", "d.com"]), st.integers(0, 3 * 60)),
        min_size=1,
        max_size=300,
    ),
    st.integers(0, 3),
)
@settings(max_examples=200, deadline=None)
def test_counts_are_exact_whatever_the_minutes_spread(
    rows: list[tuple[str, int]], spread_shift: int
) -> None:
    """(site, minute) counts equal a plain count of the rows, whether a batch is
    counted on the dense grid (a minute or two) or by sorting (minutes far apart)."""
    scale = [1, 7, 60_000, 3_600_000][spread_shift]  # ms between the rows' times
    live = LiveCounts()
    table = _table([{"ts": 100 * HOUR_MS + t * scale, "site": s} for s, t in rows])
    live.apply((0, 100, 0), table)
    expected: dict[str, Counter[int]] = {}
    for s, t in rows:
        minute_ms = (100 * HOUR_MS + t * scale) // 60_000 * 60_000
        expected.setdefault(s, Counter())[minute_ms] += 1
    for site, counts in expected.items():
        minutes, got = live.minutes(site, 0, 400 * HOUR_MS, published_upto=0)
        assert dict(zip(minutes.tolist(), got.tolist(), strict=True)) == dict(counts)


def test_bad_payloads_are_skipped_and_the_rest_counted() -> None:
    good = to_ipc(_table([{"ts": 100 * HOUR_MS, "site": "a.com", "id": "x"}]))
    other_schema = to_ipc(pa.table({"ts": [100 * HOUR_MS], "id": ["y"]}))  # no site
    live = LiveCounts()
    errors = live.apply_payloads((0, 100, 0), [b"not arrow", good, other_schema, good])
    assert len(errors) == 2
    assert "site" in errors[1]
    # the good payload counted, its repeat (same id) once; the bad ones left no trace
    assert _all_minutes(live, ["a.com"]) == {"a.com": [(100 * HOUR_MS, 1)]}
    seen = live.seen_ids[(0, 100)]
    assert len(seen) == 1
    assert seen.first(pa.array(["a.com", "a.com"]), pa.array(["x", "z"])).tolist() == [False, True]


def test_a_batch_that_cannot_count_changes_nothing() -> None:
    live = LiveCounts()
    no_ts = pa.table({"site": ["a.com"], "id": ["x"]})
    with pytest.raises(KeyError):
        live.apply((0, 100, 0), no_ts)
    # Arrow IPC does not enforce the schema's "not null": a null site is refused
    # before its batch's ids are marked seen.
    null_site = pa.table(
        {"ts": [100 * HOUR_MS, 100 * HOUR_MS], "site": ["a.com", None], "id": ["x", "y"]}
    )
    with pytest.raises(ValueError):
        live.apply((0, 100, 0), null_site)
    assert not live.blocks and not live.seen_ids.get((0, 100))
    # Counted with a good payload, the bad one is reported and the good one counted.
    good = to_ipc(_table([{"ts": 100 * HOUR_MS, "site": "a.com", "id": "x"}] * 2))
    errors = live.apply_payloads((0, 100, 0), [good, to_ipc(null_site)])
    assert len(errors) == 1 and "missing site" in errors[0]
    assert _all_minutes(live, ["a.com"]) == {"a.com": [(100 * HOUR_MS, 1)]}
    # The same with the events' own schema: read as one stream with the good ones, the
    # batch fails as a whole, and is then counted payload by payload.
    columns = {f.name: pa.nulls(2, f.type) for f in EVENT_SCHEMA}
    columns["ts"] = pa.array([100 * HOUR_MS + 60_000] * 2, pa.int64())
    columns["site"] = pa.array(["b.com", None])
    same_schema = pa.Table.from_arrays([columns[f.name] for f in EVENT_SCHEMA], schema=EVENT_SCHEMA)
    other = to_ipc(_table([{"ts": 100 * HOUR_MS + 60_000, "site": "b.com"}]))
    errors = live.apply_payloads((0, 100, 0), [other, to_ipc(same_schema), other])
    assert len(errors) == 1 and "missing site" in errors[0]
    assert _all_minutes(live, ["b.com"]) == {"b.com": [(100 * HOUR_MS + 60_000, 2)]}


def test_a_batch_of_other_types_marks_no_id_seen() -> None:
    """A time that is not an integer, or ids that are not strings, are refused before
    any id is marked seen: the good batch after it, with the same id, still counts."""
    live, key = LiveCounts(), (0, 100, 0)
    float_ts = pa.table({"ts": [100.0 * HOUR_MS], "site": ["a.com"], "id": ["x"]})
    int_ids = pa.table({"ts": [100 * HOUR_MS], "site": ["a.com"], "id": [7]})
    too_late = pa.table({"ts": pa.array([2**63 + 5], pa.uint64()), "site": ["a.com"], "id": ["x"]})
    for bad in (float_ts, int_ids):
        with pytest.raises(TypeError):
            live.apply(key, bad)
    with pytest.raises(pa.ArrowInvalid):  # does not fit an int64: a safe cast refuses it
        live.apply(key, too_late)
    assert not live.blocks and not live.seen_ids.get((0, 100))
    good = _table([{"ts": 100 * HOUR_MS, "site": "a.com", "id": "x"}])
    errors = live.apply_payloads(key, [to_ipc(float_ts), to_ipc(good), to_ipc(int_ids)])
    assert len(errors) == 2 and all("TypeError" in e for e in errors)
    assert _all_minutes(live, ["a.com"]) == {"a.com": [(100 * HOUR_MS, 1)]}
    # A time before 1970 (or past the year 10136) is bad data, reported, not a crash.
    before_1970 = _table([{"ts": -120_000, "site": "a.com", "id": "y"}])
    errors = live.apply_payloads(key, [to_ipc(before_1970), to_ipc(good)])
    assert len(errors) == 1 and "out of range" in errors[0]
    assert _all_minutes(live, ["a.com"]) == {"a.com": [(100 * HOUR_MS, 1)]}  # x: counted


@pytest.fixture(scope="module")
def live_cluster(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("live"), serve_port, redis_url, "flowray-live"
    )
    with running_cluster(settings) as running:
        yield running


def _series(client: httpx.Client, site: str, start_ms: int) -> list[dict[str, Any]]:
    r = client.get(
        f"/v1/sites/{site}/traffic",
        params={"start": str(start_ms), "end": str(start_ms + HOUR_MS), "interval": "minute"},
    )
    assert r.status_code == 200, r.text
    points: list[dict[str, Any]] = r.json()["points"]
    return points


def _counts(client: httpx.Client, start_ms: int) -> dict[str, Counter[int]]:
    out = {}
    for site in SITES:
        points = _series(client, site, start_ms)
        out[site] = Counter({i: p["count"] for i, p in enumerate(points) if p["count"]})
    return out


@pytest.mark.parametrize("tail_max", [4, 1 << 16])
def test_live_counts_equal_a_plain_count(tail_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small batches over a few blocks, merged often or never, queried at random
    ranges: the same answers as counting every event in a dict."""
    monkeypatch.setattr(live_module, "TAIL_KEYS_MAX", tail_max)
    rng = random.Random(3)
    live, plain = LiveCounts(), Counter[tuple[str, int]]()
    base = 1_700_000_000_000 // HOUR_MS * HOUR_MS
    for _ in range(300):
        block = (rng.randrange(3), base // HOUR_MS, 0)
        rows = [
            {"ts": base + rng.randrange(HOUR_MS), "site": rng.choice(SITES)}
            for _ in range(rng.randrange(1, 40))
        ]
        live.apply(block, _table(rows))
        plain.update((r["site"], r["ts"] // 60_000 * 60_000) for r in rows)
    for _ in range(200):
        site = rng.choice([*SITES, "never.example"])
        start = base + rng.randrange(-HOUR_MS, HOUR_MS)
        end = start + rng.randrange(2 * HOUR_MS)
        minutes, counts = live.minutes(site, start, end, published_upto=0)
        want = sorted((m, n) for (s, m), n in plain.items() if s == site and start <= m < end)
        assert list(zip(minutes.tolist(), counts.tolist(), strict=True)) == want


def test_acknowledged_events_are_visible_within_seconds(
    live_cluster: tuple[cluster.Cluster, str],
) -> None:
    _running, url = live_cluster
    now = int(time.time() * 1000)
    hour = now // HOUR_MS * HOUR_MS
    with httpx.Client(base_url=url, timeout=30) as client:
        acked = time.monotonic()
        r = client.post("/v1/events", json=[{"ts": now, "site": "now.example"}])
        assert r.status_code == 200
        deadline = acked + 5
        while True:
            points = _series(client, "now.example", hour)
            seen = [p for p in points if p["count"]]
            if seen:
                break
            assert time.monotonic() < deadline, "not visible within 5 s of the acknowledgement"
            time.sleep(0.1)
        assert seen[0]["count"] == 1 and seen[0]["provisional"] is True


def test_published_counts_equal_live_counts_across_a_master_kill(
    live_cluster: tuple[cluster.Cluster, str],
) -> None:
    _running, url = live_cluster
    start = (int(time.time() * 1000) // HOUR_MS - 30) * HOUR_MS  # an hour long past
    rng = random.Random(3)
    events = [
        {"ts": start + rng.randrange(HOUR_MS), "site": rng.choice(SITES), "id": f"e{i}"}
        for i in range(3000)
    ]
    events += events[:200]  # retried duplicates: counted once, live and published
    events += [
        {"ts": start + rng.randrange(HOUR_MS), "site": rng.choice(SITES)} for _ in range(1000)
    ]
    with httpx.Client(base_url=url, timeout=60) as client:
        for lo in range(0, len(events), 400):
            assert client.post("/v1/events", json=events[lo : lo + 400]).status_code == 200
        time.sleep(1.5)  # provisional answers are cached for a second
        live = _counts(client, start)
        assert sum(sum(c.values()) for c in live.values()) == 4000
        kill9(replica_pid(url, 0, "master"))
        deadline = time.monotonic() + 30
        while True:  # the new master rebuilds its live counts from its log
            time.sleep(1.5)
            try:
                rebuilt = _counts(client, start)
            except AssertionError:
                rebuilt = {}
            if rebuilt == live:
                break
            assert time.monotonic() < deadline, "live counts differ after failover"
        result = client.post("/v1/admin/process", params={"mode": "closed"}).json()
        assert result.get("events") == 4000, result
        published = _counts(client, start)
        assert published == live
        points = _series(client, SITES[0], start)
        assert not any(p["provisional"] for p in points)


def test_late_events_are_counted_and_republish_their_hour(
    live_cluster: tuple[cluster.Cluster, str],
) -> None:
    _running, url = live_cluster
    start = (int(time.time() * 1000) // HOUR_MS - 50) * HOUR_MS
    site = "late.example"
    with httpx.Client(base_url=url, timeout=60) as client:
        first = [{"ts": start + i * 1000, "site": site} for i in range(30)]
        assert client.post("/v1/events", json=first).status_code == 200
        assert client.post("/v1/admin/process", params={"mode": "closed"}).json()["events"]
        late = [{"ts": start + 120_000 + i, "site": site} for i in range(7)]
        assert client.post("/v1/events", json=late).status_code == 200
        status = client.get("/v1/admin/status").json()
        master = [r for g in status["groups"] for r in g["replicas"] if r["role"] == "master"]
        assert sum(r["late_events"] for r in master) >= 7
        result = client.post("/v1/admin/process", params={"mode": "closed"}).json()
        assert result["units"] >= 1
        status = client.get("/v1/admin/status").json()
        assert status["processor"]["republished_units"] >= 1
        deadline = time.monotonic() + 5  # the masters hear of the publish asynchronously
        while True:
            status = client.get("/v1/admin/status").json()
            groups = status["groups"]
            master = [r for g in groups for r in g["replicas"] if r["role"] == "master"]
            if all(r["sealed_pending"] == 0 for r in master):
                break
            assert time.monotonic() < deadline, f"still pending: {master}"
            time.sleep(0.2)
        time.sleep(1.2)
        total = sum(p["count"] for p in _series(client, site, start))
        assert total == 37, "late events are counted, never dropped"


def test_live_facts_keep_fielded_events_within_their_bound() -> None:
    """Events with insight fields are kept (for live visitors and breakdowns) until the
    bound; the rest of each minute is still counted, and the query side turns it into
    page views without fields, so every event is in the live facts exactly once."""
    from flowray.query import facts

    minute = 1_700_000_040_000  # a minute's start
    key = (0, minute // 3_600_000, 0)
    with_fields = [
        {"ts": minute + i, "site": "a.com", "path": f"/p{i % 3}", "visitor": f"v{i % 4}"}
        for i in range(40)
    ]
    bare = [{"ts": minute + 5, "site": "a.com"} for _ in range(7)]
    probe = LiveCounts()
    probe.apply(key, _table(with_fields[:20]))
    live = LiveCounts(rich_bytes_max=probe.rich_bytes)  # full after the first batch
    live.apply(key, _table(with_fields[:20]))
    live.apply(key, _table(with_fields[20:] + bare))
    minutes, counts, rich = live.facts("a.com", minute, minute + 60_000, 0)
    assert (minutes.tolist(), counts.tolist()) == ([minute], [47])
    assert rich is not None and rich.num_rows == 20  # only the first batch was kept
    table = facts.live_facts("a.com", (minutes.tolist(), counts.tolist(), rich))
    assert sum(table.column("count").to_pylist()) == 47
    kept = [r for r in table.to_pylist() if r["visitor"] is not None]
    assert sum(r["count"] for r in kept) == 20
    assert {r["path"] for r in kept} == {"/p0", "/p1", "/p2"}
    assert len({r["visitor"] for r in kept}) == 4
    # Another site, and a range that misses the minute, see nothing.
    assert live.facts("b.com", minute, minute + 60_000, 0)[2] is None
    assert live.facts("a.com", minute + 60_000, minute + 120_000, 0)[2] is None


def test_live_facts_hold_a_retried_event_once() -> None:
    """A retried batch is committed (and kept) again; its ids count once, as in the
    counts, whichever part of the live facts holds them."""
    from flowray.query import facts

    minute = 1_700_000_040_000
    key = (0, minute // 3_600_000, 0)
    batch = [
        {"ts": minute + i, "site": "a.com", "path": "/", "visitor": "v", "id": f"e{i}"}
        for i in range(5)
    ]
    live = LiveCounts()
    live.apply_payloads(key, [to_ipc(_table(batch), compress=True)])
    live.apply_payloads(key, [to_ipc(_table(batch), compress=True)])  # the retry
    found = live.facts("a.com", minute, minute + 60_000, 0, shard=0)
    assert found[1].tolist() == [5]
    assert found[2] is not None and found[2].num_rows == 5
    table = facts.live_facts("a.com", (found[0].tolist(), found[1].tolist(), found[2]))
    assert table.to_pylist()[0]["count"] == 5 and table.num_rows == 1
    assert live.facts("a.com", minute, minute + 60_000, 0, shard=1)[2] is None  # other shard
