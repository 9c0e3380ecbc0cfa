"""End to end on a real cluster: real Ray actors, real files with fsync, real Ray
tasks, real Parquet and DuckDB, real Redis, real Ray Serve, all over HTTP.

100,000+ events over 1,000 sites spanning more than three hours, out of order within
minutes and crossing hour and day boundaries, are ingested in concurrent batches of
every body form; then processed; then every site's minute, hour and day series is
compared with an independent count made directly with DuckDB.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pyarrow as pa
import pytest

from flowray.cluster import control as cluster
from flowray.config import Settings
from flowray.core.router import ShardMap
from flowray.ingest.pieces import from_ipc
from flowray.storage import segment
from flowray.storage.segment import KIND_DATA
from tests.helpers import cluster_settings, running_cluster

SITES = 1000
EVENTS = 100_000
START = datetime(2024, 5, 1, 21, 10, tzinfo=UTC)
SPAN_MS = int(3.5 * 3_600_000)  # 21:10 -> 00:40 next day: crosses hours and a day


@pytest.fixture(scope="module")
def running(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("e2e"),
        serve_port,
        redis_url,
        "flowray-e2e",
        groups=2,
        shards=6,
        reduce_keys=3,
    )
    with running_cluster(settings) as (the_cluster, url):
        yield the_cluster, url


def _make_events(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    sites = [f"site{i:04d}.example.com" for i in range(SITES)]
    weights = [1.0 / (1 + i % 50) for i in range(SITES)]  # some busy, some quiet
    chosen = rng.choices(sites, weights, k=EVENTS)
    chosen[:SITES] = sites  # every site has traffic
    base = int(START.timestamp() * 1000)
    events = []
    for n, site in enumerate(chosen):
        ts = base + rng.randrange(SPAN_MS)
        event: dict[str, Any] = {"ts": ts, "site": site, "path": f"/p/{n}"}
        if n % 3 == 0:
            event["id"] = f"e{n}"
        events.append(event)
    # Out of order within minutes: sort by minute, shuffle inside each minute.
    events.sort(key=lambda e: (e["ts"] // 60_000, rng.random()))
    return events


def _body(kind: str, batch: list[dict[str, Any]]) -> tuple[bytes, str, str]:
    if kind == "json":
        return orjson.dumps(batch), "application/json", "/v1/events"
    if kind == "ndjson":
        return b"\n".join(orjson.dumps(e) for e in batch), "application/x-ndjson", "/v1/events"
    lines = []
    for e in batch:
        t = datetime.fromtimestamp(e["ts"] / 1000, tz=UTC)
        lines.append(f"{t:%Y.%m.%d %H:%M:%S}.{e['ts'] % 1000:03d} {e['site']}")
    return "\n".join(lines).encode(), "text/plain", "/v1/logs"


def _post(url: str, batch: list[dict[str, Any]], kind: str) -> int:
    body, ctype, path = _body(kind, batch)
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.post(path, content=body, headers={"Content-Type": ctype})
    assert response.status_code == 200, response.text
    accepted: int = response.json()["accepted"]
    assert accepted == len(batch)
    return accepted


def _reference(events: list[dict[str, Any]], tmp: Path) -> duckdb.DuckDBPyConnection:
    """Independent counts made directly with DuckDB; (site, id) counted once."""
    table = pa.table(
        {
            "ts": [e["ts"] for e in events],
            "site": [e["site"] for e in events],
            "id": [e.get("id") for e in events],
        }
    )
    con = duckdb.connect()
    con.register("raw", table)
    con.execute("""
        CREATE TABLE ev AS
        SELECT ts, site FROM raw WHERE id IS NULL
        UNION ALL
        SELECT min(ts), site FROM raw WHERE id IS NOT NULL GROUP BY site, id
    """)
    return con


def test_ingest_process_query_matches_duckdb(
    running: tuple[cluster.Cluster, str], tmp_path: Path
) -> None:
    the_cluster, url = running
    events = _make_events(seed=7)
    kinds = ["json", "ndjson"]
    batches = [events[i : i + 2500] for i in range(0, len(events), 2500)]
    # Seed-form lines carry no id, so send only id-less events that way.
    jobs: list[tuple[list[dict[str, Any]], str]] = []
    for n, batch in enumerate(batches):
        kind = kinds[n % 2]
        if n % 5 == 4:
            plain = [e for e in batch if "id" not in e]
            with_id = [e for e in batch if "id" in e]
            jobs += [(plain, "seed"), (with_id, "json")]
        else:
            jobs.append((batch, kind))
    # A client retry: the same id-bearing batch sent again must not count twice.
    retried = [e for e in batches[3] if "id" in e]
    jobs.append((retried, "ndjson"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        accepted = sum(pool.map(lambda job: _post(url, *job), jobs))
    assert accepted == EVENTS + len(retried)

    _check_majority_on_disk(the_cluster.settings, events + retried)

    with httpx.Client(base_url=url, timeout=600) as client:
        result = client.post("/v1/admin/process", params={"mode": "closed"}).json()
    assert result["blocks"] > 0 and result["events"] == EVENTS, result
    replicas = [r for g in _status(url)["groups"] for r in g["replicas"]]
    assert sum(r["reads_served"] for r in replicas if r["role"] == "follower") > 0
    assert sum(r["reads_served"] for r in replicas if r["role"] == "master") == 0, (
        "processing should read sealed blocks from followers, sparing the masters"
    )
    # Every replica, followers too, forgets where the published entries lie.
    deadline = time.monotonic() + 30
    while any(r["released_index"] == 0 for r in replicas):
        assert time.monotonic() < deadline, [r["released_index"] for r in replicas]
        time.sleep(0.2)
        replicas = [r for g in _status(url)["groups"] for r in g["replicas"]]

    ref = _reference(events, tmp_path)
    _compare_all_sites(url, ref)


def _series(
    client: httpx.Client, site: str, interval: str, tz: str, start: str, end: str
) -> dict[str, int]:
    response = client.get(
        f"/v1/sites/{site}/traffic",
        params={"start": start, "end": end, "interval": interval, "tz": tz},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["site"] == site and body["interval"] == interval and body["tz"] == tz
    return {p["t"]: p["count"] for p in body["points"]}


def _compare_all_sites(url: str, ref: duckdb.DuckDBPyConnection) -> None:
    start, end = "2024-05-01T00:00:00Z", "2024-05-03T00:00:00Z"
    minute_ref = _grouped(ref, "ts // 60000 * 60000")
    hour_ref = _grouped(ref, "ts // 3600000 * 3600000")
    day_ref = _grouped(ref, "ts // 86400000 * 86400000")
    # Asia/Kolkata is UTC+05:30: its hours start at :30 UTC, counted here without zoneinfo.
    kolkata_ref = _grouped(ref, "(ts - 1800000) // 3600000 * 3600000 + 1800000")
    sites = [r[0] for r in ref.execute("SELECT DISTINCT site FROM ev ORDER BY 1").fetchall()]
    assert len(sites) == SITES
    with httpx.Client(base_url=url, timeout=60) as client:
        for n, site in enumerate(sites):
            got = _series(
                client, site, "minute", "UTC", "2024-05-01T21:00:00Z", "2024-05-02T01:00:00Z"
            )
            assert len(got) == 240  # dense: every minute, zeros included
            assert _nonzero(got) == minute_ref[site], site
            got = _series(client, site, "hour", "UTC", start, end)
            assert len(got) == 48
            assert _nonzero(got) == hour_ref[site], site
            got = _series(client, site, "day", "UTC", start, end)
            assert len(got) == 2
            assert _nonzero(got) == day_ref[site], site
            if n % 10 == 0:
                got = _series(client, site, "hour", "Asia/Kolkata", start, end)
                assert _nonzero(got) == kolkata_ref[site], site


def _grouped(ref: duckdb.DuckDBPyConnection, bucket_sql: str) -> dict[str, dict[str, int]]:
    rows = ref.execute(f"SELECT site, {bucket_sql} AS b, count(*) FROM ev GROUP BY ALL").fetchall()
    out: dict[str, dict[str, int]] = {}
    for site, bucket, count in rows:
        out.setdefault(site, {})[datetime.fromtimestamp(bucket / 1000, tz=UTC)] = count
    return out


def _nonzero(points: dict[str, int]) -> dict[datetime, int]:
    return {datetime.fromisoformat(t).astimezone(UTC): c for t, c in points.items() if c}


def _check_majority_on_disk(settings: Settings, acknowledged: list[dict[str, Any]]) -> None:
    """Every acknowledged event is in the segment files of a majority of its group.

    Events are told apart by (site, ts) with multiplicity, since seed-form lines carry
    nothing else; a retried batch counts as many times as it was acknowledged.
    """
    shard_map = ShardMap.round_robin(settings.shards, settings.groups)
    majority = settings.replicas // 2 + 1
    for group in range(settings.groups):
        want = Counter(
            (e["site"], e["ts"])
            for e in acknowledged
            if shard_map.group_of_site(e["site"]) == group
        )
        assert want, f"group {group} received no events"
        per_replica = [
            _events_on_disk(settings.replica_dir(group, r)) for r in range(settings.replicas)
        ]
        short = [k for k, n in want.items() if sum(got[k] >= n for got in per_replica) < majority]
        assert not short, f"group {group}: {len(short)} events on fewer than {majority} replicas"


def _events_on_disk(root: Path) -> Counter[tuple[str, int]]:
    got: Counter[tuple[str, int]] = Counter()
    for seg in sorted((root / "blocks").glob("s*/*.seg")):
        for entry in segment.read_entries(seg):
            if entry.kind == KIND_DATA:
                table = from_ipc(entry.payload)
                got.update(
                    zip(
                        table.column("site").to_pylist(),
                        table.column("ts").to_pylist(),
                        strict=True,
                    )
                )
    return got


def _status(url: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=30) as client:
        body: dict[str, Any] = client.get("/v1/admin/status").json()
        return body


def _last_indexes(url: str) -> list[int]:
    with httpx.Client(base_url=url, timeout=30) as client:
        status = client.get("/v1/admin/status").json()
    return [r["last_index"] for g in status["groups"] for r in g["replicas"]]


BAD_BODIES: list[tuple[str, bytes, str, int]] = [
    ("/v1/events", b'[{"ts": 1, "site": ', "application/json", 422),
    ("/v1/events", b'[{"ts": "yesterday", "site": "a.com"}]', "application/json", 422),
    ("/v1/events", b'[{"ts": 0, "site": "a.com"}]', "application/json", 422),
    ("/v1/events", b'[{"ts": 32503680000000, "site": "a.com"}]', "application/json", 422),
    ("/v1/events", b'[{"ts": 1714600000000}]', "application/json", 422),
    ("/v1/events", b'[{"ts": 1714600000000, "site": "not a site"}]', "application/json", 422),
    ("/v1/events", b'[{"ts": 1714600000000, "site": 42}]', "application/json", 422),
    ("/v1/events", b"[]", "application/json", 422),
    ("/v1/events", b'{"ts": 1714600000000, "site": "a.com"}\n{oops', "application/x-ndjson", 422),
    ("/v1/logs", b"2024.05.01 21:00:00.000 a.com\nthis is garbage\n", "text/plain", 422),
]


def test_bad_input_is_rejected_whole_and_the_cluster_keeps_serving(
    running: tuple[cluster.Cluster, str],
) -> None:
    _the_cluster, url = running
    before = _last_indexes(url)
    with httpx.Client(base_url=url, timeout=30) as client:
        for path, body, ctype, status in BAD_BODIES:
            response = client.post(path, content=body, headers={"Content-Type": ctype})
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"], body
        good_then_bad = orjson.dumps(
            [{"ts": 1714600000000, "site": "good.com"}, {"ts": "nope", "site": "good.com"}]
        )
        response = client.post(
            "/v1/events", content=good_then_bad, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422
        assert [e["position"] for e in response.json()["errors"]] == [1]
        huge = b"[" + b",".join([b'{"ts":1714600000000,"site":"a.com"}'] * 1_100_000) + b"]"
        response = client.post(
            "/v1/events", content=huge, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
    assert _last_indexes(url) == before, "a rejected batch must store nothing"
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        response = client.post("/v1/events", json=[{"ts": 1714600000000, "site": "ok.com"}])
        assert response.status_code == 200 and response.json() == {"accepted": 1}


def test_scoped_tokens_on_the_real_cluster(running: tuple[cluster.Cluster, str]) -> None:
    """Last in this module: creating a token switches the cluster's auth on (auto)."""
    from flowray.api.auth import TokenStore

    the_cluster, url = running
    gateway = f"http://127.0.0.1:{the_cluster.settings.ingest_port}"
    store = TokenStore(the_cluster.settings.tokens_file)
    reader, _ = store.create("read", ["site0001.example.com"], name="merchant 1")
    writer, _ = store.create("ingest", ["site0001.example.com"], name="tracker 1")
    params = {"start": "2024-05-01T21:00:00Z", "end": "2024-05-01T22:00:00Z"}
    own, other = "/v1/sites/site0001.example.com/traffic", "/v1/sites/site0002.example.com/traffic"
    event = {"ts": 1714600000000, "site": "site0002.example.com"}
    for base in (url, gateway):
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 10  # the token list is re-read every 2 s
            while client.get(own, params=params).status_code != 401:
                assert time.monotonic() < deadline, "auth did not switch on"
                time.sleep(0.3)
            read = {"Authorization": f"Bearer {reader}"}
            assert client.get(own, params=params, headers=read).status_code == 200
            denied = client.get(other, params=params, headers=read)
            assert denied.status_code == 403, denied.text
            assert (
                client.get(
                    "/v1/sites/SITE0002.example.com./traffic", params=params, headers=read
                ).status_code
                == 403
            )
            write = {"Authorization": f"Bearer {writer}"}
            response = client.post("/v1/events", json=[event], headers=write)
            assert response.status_code == 403 and "site0002.example.com" in response.text
            assert client.post("/v1/events", json=[event], headers=read).status_code == 403
            assert client.get("/v1/admin/status", headers=read).status_code == 403
            assert client.get("/healthz").status_code == 200
