"""Tests for the HTTP app, driven in-process through ``httpx.ASGITransport``.

Ingest goes to a fake that records every committed piece, so a test can reassemble
exactly what would have been appended to the groups' logs and check its routing. Queries
go to a real (small) Parquet warehouse in ``tmp_path``, written by the same pure
map-reduce functions the Ray tasks wrap and published through the real catalog.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from flowray.api.app import WARM_EVENTS, Unavailable, create_app
from flowray.config import Settings
from flowray.core.router import ShardMap, shard_for_site
from flowray.ingest.events import EVENT_SCHEMA, TS_MIN_MS
from flowray.ingest.pieces import HOUR_MS, GroupEvents, Piece, from_ipc, split_batch
from flowray.query.cache import Cache, MemoryCache, RedisCache
from flowray.tasks.mapreduce import map_block_slices, reduce_partials, write_units
from flowray.warehouse.files import Warehouse
from tests.fakes import FakeAdmin, as_pieces, client_for

NOW_S = 1_700_000_000.0  # 2023-11-14T22:13:20Z, the injected server clock
NOW_MS = int(NOW_S * 1000)
SKEW_S = 300.0
SHARD_MAP = ShardMap.round_robin(10, 5)  # the seed layout: 10 shards, 5 groups
REDUCE_KEYS = 2
ROUTES = {
    "/",
    "/healthz",
    "/metrics",
    "/v1/events",
    "/v1/logs",
    "/v1/sites/{site}/traffic",
    "/v1/sites/{site}/timeseries",
    "/v1/sites/{site}/totals",
    "/v1/sites/{site}/breakdown",
    "/v1/sites",
    "/v1/sites/{domain}",
    "/api/event",
    "/api/v2/query",
    "/v1/admin/status",
    "/v1/admin/process",
    "/v1/admin/reprocess",
    "/v1/admin/rollback",
    "/v1/admin/jobs/{job_id}",
    "/v1/admin/versions",
    "/v1/admin/restart",
    "/v1/admin/shards/{shard}/move",
}


def ms(text: str) -> int:
    """Epoch ms of an ISO-8601 time that carries its zone."""
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, text
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- fakes


class RecordingIngest:
    """Records every committed batch of pieces; raises ``error`` instead when it is set."""

    def __init__(self) -> None:
        self.commits: list[dict[int, list[Piece]]] = []
        self.error: Exception | None = None

    async def commit(self, groups: dict[int, GroupEvents]) -> None:
        pieces = as_pieces(groups, SHARD_MAP.shard_count)
        if self.error is not None:
            raise self.error
        self.commits.append(pieces)

    def pieces(self) -> list[tuple[int, Piece]]:
        return [(group, p) for batch in self.commits for group, ps in batch.items() for p in ps]

    def events(self) -> list[dict[str, Any]]:
        """Every stored event, reassembled from the pieces' Arrow IPC payloads."""
        rows: list[dict[str, Any]] = []
        for _group, piece in self.pieces():
            table = from_ipc(piece.payload)
            assert table.schema.equals(EVENT_SCHEMA)
            rows += table.to_pylist()
        return rows


class CountingCache:
    """Wraps a real cache and counts what the app asks of it."""

    def __init__(self, inner: Cache) -> None:
        self.inner = inner
        self.name = inner.name
        self.gets = 0
        self.hits = 0
        self.sets = 0

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        value = await self.inner.get(key)
        self.hits += value is not None
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self.sets += 1
        await self.inner.set(key, value, ttl_s)

    async def close(self) -> None:
        await self.inner.close()


# --------------------------------------------------------------------------- warehouse


def publish(warehouse: Warehouse, events: list[tuple[str, str]], job: str) -> int:
    """Process (site, ISO time) events into units and publish them; returns the generation.

    A (shard, hour) unit published again replaces the earlier one, as re-processing does.
    """
    table = pa.Table.from_pylist(
        [{"ts": ms(t), "site": site} for site, t in events], schema=EVENT_SCHEMA
    )
    pieces = [p for ps in split_batch(table, SHARD_MAP).values() for p in ps]
    blocks = [(p.shard, p.hour) for p in pieces]
    partials = map_block_slices(blocks, [[p.payload] for p in pieces], "default", REDUCE_KEYS)
    reduced = [reduce_partials([partials[k]]) for k in range(REDUCE_KEYS)]
    units = write_units(warehouse.root, "default", job, reduced, [(s, h, 1) for s, h in blocks])
    return warehouse.catalog.publish(units, {})


SITE = "shop.example"
# 11 events of SITE (1 on 2023-11-13, 10 on 2023-11-14) and 5 of another site.
SITE_EVENTS: list[tuple[str, str]] = [
    (SITE, "2023-11-13T23:50:00+00:00"),
    (SITE, "2023-11-14T10:00:05+00:00"),
    (SITE, "2023-11-14T10:00:06+00:00"),
    (SITE, "2023-11-14T10:00:59.999+00:00"),
    (SITE, "2023-11-14T10:07:30+00:00"),
    *[(SITE, "2023-11-14T11:59:00+00:00")] * 4,
    *[(SITE, "2023-11-14T13:15:00+00:00")] * 2,
    *[("other.example", "2023-11-14T10:00:00+00:00")] * 5,
]


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[Warehouse]:
    wh = Warehouse(tmp_path / "warehouse", SHARD_MAP.shard_count)
    yield wh
    wh.catalog.close()


@pytest.fixture
def loaded(warehouse: Warehouse) -> Warehouse:
    """A warehouse of SITE_EVENTS that the test may change (publish, move the watermark)."""
    publish(warehouse, SITE_EVENTS, "job1")
    return warehouse


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warehouse]:
    """A warehouse of SITE_EVENTS for tests that only read it (written once: it is slow)."""
    wh = Warehouse(tmp_path_factory.mktemp("shared") / "warehouse", SHARD_MAP.shard_count)
    publish(wh, SITE_EVENTS, "job1")
    yield wh
    wh.catalog.close()


# --------------------------------------------------------------------------- app


def make_app(
    *,
    ingest: RecordingIngest | None = None,
    warehouse: Any = None,
    cache: Cache | None = None,
    admin: FakeAdmin | None = None,
    **overrides: Any,
) -> FastAPI:
    settings = Settings(
        shards=SHARD_MAP.shard_count,
        groups=SHARD_MAP.group_count,
        future_skew_s=SKEW_S,
        **overrides,
    )
    return create_app(
        settings=settings,
        shard_map=SHARD_MAP,
        ingest=ingest or RecordingIngest(),
        warehouse=warehouse,
        admin=admin or FakeAdmin(),
        cache=cache or MemoryCache(),
        clock=lambda: NOW_S,
    )


@pytest.fixture
def ingest() -> RecordingIngest:
    return RecordingIngest()


@pytest.fixture
async def client(
    ingest: RecordingIngest, shared: Warehouse, front: str
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(ingest=ingest, warehouse=shared), front) as c:
        yield c


@pytest.fixture
async def own_client(loaded: Warehouse) -> AsyncIterator[httpx.AsyncClient]:
    """A client over a warehouse of its own, for tests that change the warehouse."""
    async with client_for(make_app(warehouse=loaded)) as c:
        yield c


def event_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(f.name) for f in EVENT_SCHEMA)


def assert_stored(ingest: RecordingIngest, expected: list[dict[str, Any]]) -> None:
    """The fake received exactly ``expected`` (as a multiset), each piece routed right."""
    full = [{f.name: e.get(f.name) for f in EVENT_SCHEMA} for e in expected]
    assert sorted(map(event_key, ingest.events())) == sorted(map(event_key, full))
    for group, piece in ingest.pieces():
        rows = from_ipc(piece.payload).to_pylist()
        assert piece.events == len(rows) > 0
        assert SHARD_MAP.group_of_shard(piece.shard) == group
        for row in rows:
            assert shard_for_site(row["site"], SHARD_MAP.shard_count) == piece.shard
            assert row["ts"] // HOUR_MS == piece.hour


async def assert_still_serving(client: httpx.AsyncClient, ingest: RecordingIngest) -> None:
    before = len(ingest.events())
    good = {"ts": NOW_MS - 1000, "site": "alive.example"}
    answer = await client.post("/v1/events", json=good)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 1}
    assert len(ingest.events()) == before + 1


# --------------------------------------------------------------------------- ingest: accepted

# Sites chosen to land in several groups; times in two hours and two forms.
BATCH: list[dict[str, Any]] = [
    {"ts": "2023-11-14T10:00:00.123Z", "site": "Example.COM.", "path": "/a", "id": "e1"},
    {"ts": NOW_MS - 3_600_000, "site": "shop.example", "referrer": "https://r.example/"},
    {"ts": "2023-11-14T12:30:00+02:00", "site": "news.example", "ua": "curl/8", "visitor": "v9"},
    {"ts": str(NOW_MS), "site": "blog.example", "id": 42},
    {"site": "shop.example", "path": "/no-ts"},
    {"ts": NOW_MS + int(SKEW_S * 1000), "site": "edge.example"},
    {"ts": TS_MIN_MS, "site": "old.example"},
]
BATCH_STORED: list[dict[str, Any]] = [
    {"ts": ms("2023-11-14T10:00:00.123+00:00"), "site": "example.com", "path": "/a", "id": "e1"},
    {"ts": NOW_MS - 3_600_000, "site": "shop.example", "referrer": "https://r.example/"},
    {
        "ts": ms("2023-11-14T10:30:00+00:00"),
        "site": "news.example",
        "ua": "curl/8",
        "visitor": "v9",
    },
    {"ts": NOW_MS, "site": "blog.example", "id": "42"},
    {"ts": NOW_MS, "site": "shop.example", "path": "/no-ts"},
    {"ts": NOW_MS + int(SKEW_S * 1000), "site": "edge.example"},
    {"ts": TS_MIN_MS, "site": "old.example"},
]


@pytest.mark.anyio
async def test_json_array_is_committed_whole_and_routed(
    client: httpx.AsyncClient, ingest: RecordingIngest
) -> None:
    answer = await client.post("/v1/events", json=BATCH)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": len(BATCH)}
    assert len(ingest.commits) == 1  # one commit call per request
    assert_stored(ingest, BATCH_STORED)
    assert len({g for g, _ in ingest.pieces()}) > 1, "the batch should span several groups"


@pytest.mark.anyio
async def test_single_object_is_one_event(
    client: httpx.AsyncClient, ingest: RecordingIngest
) -> None:
    answer = await client.post("/v1/events", json=BATCH[0])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 1}
    assert_stored(ingest, BATCH_STORED[:1])


@pytest.mark.anyio
@pytest.mark.parametrize("ctype", ["application/x-ndjson", "Application/X-NDJSON; charset=utf-8"])
async def test_ndjson_lines_are_events(
    client: httpx.AsyncClient, ingest: RecordingIngest, ctype: str
) -> None:
    lines = [orjson.dumps(e) for e in BATCH]
    body = b"\n".join(lines[:3]) + b"\n\n  \n" + b"\r\n".join(lines[3:]) + b"\n"
    answer = await client.post("/v1/events", content=body, headers={"content-type": ctype})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": len(BATCH)}
    assert_stored(ingest, BATCH_STORED)


@pytest.mark.parametrize("batch_events_max", [10, 100_000])
def test_warm_parses_and_routes_each_form_and_commits_nothing(
    ingest: RecordingIngest, monkeypatch: pytest.MonkeyPatch, batch_events_max: int
) -> None:
    """The gateway warms its app before serving: a small and a large body of each form
    is parsed (so the exact and the fast parsers run) and routed, and nothing reaches
    the groups."""
    from flowray.ingest import events as ev

    parsed: list[tuple[str, int]] = []
    for name in ("parse_ndjson_events", "parse_json_events", "parse_seed_events"):
        real = getattr(ev, name)

        def spy(body: bytes, limits: ev.Limits, real: Any = real, name: str = name) -> Any:
            out = real(body, limits)
            parsed.append((name, ev.event_count(out)))
            return out

        monkeypatch.setattr(ev, name, spy)
    app = make_app(ingest=ingest, batch_events_max=batch_events_max)
    app.state.warm()  # within the batch limit: a small one must not stop a gateway
    assert sorted(parsed) == sorted(
        (name, n)
        for name in ("parse_ndjson_events", "parse_json_events", "parse_seed_events")
        for n in (1, min(WARM_EVENTS, batch_events_max))
    )
    assert ingest.commits == []


@pytest.mark.anyio
async def test_seed_lines_are_events(client: httpx.AsyncClient, ingest: RecordingIngest) -> None:
    body = (
        "2023.11.14 07:20:39.595 taobao.com\n"
        "2023.11.14 07:20:40 Shop.Example\n"
        "\n"
        "2023.11.14T21:59:59.9 news.example\n"
    )
    answer = await client.post(
        "/v1/logs", content=body.encode(), headers={"content-type": "text/plain"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 3}
    assert_stored(
        ingest,
        [
            {"ts": ms("2023-11-14T07:20:39.595+00:00"), "site": "taobao.com"},
            {"ts": ms("2023-11-14T07:20:40+00:00"), "site": "shop.example"},
            {"ts": ms("2023-11-14T21:59:59.900+00:00"), "site": "news.example"},
        ],
    )


@pytest.mark.anyio
async def test_accepted_events_are_counted_in_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/v1/events", json=BATCH)
    await client.post("/v1/events", json=BATCH[0])
    await client.post("/v1/events", json=[{"ts": 0, "site": "x.example"}])
    text = (await client.get("/metrics")).text
    assert f"flowray_ingest_events_total {float(len(BATCH) + 1)}" in text
    assert 'flowray_ingest_rejected_total{status="422"} 1.0' in text
    assert "flowray_ingest_commit_seconds_count 2.0" in text


# --------------------------------------------------------------------------- ingest: rejected

JSON = "application/json"
NDJSON = "application/x-ndjson"
TEXT = "text/plain"
GOOD = {"ts": NOW_MS, "site": "good.example"}
TOO_LATE_MS = NOW_MS + int(SKEW_S * 1000) + 1


def j(value: Any) -> bytes:
    return orjson.dumps(value)


# (route, content type, body, [(position, reason pattern), ...]): every bad item listed.
REJECTED: list[tuple[str, str, str, bytes, list[tuple[int, str]]]] = [
    (
        "malformed-json",
        "/v1/events",
        JSON,
        b'[{"ts": 1, "site": "a.example"',
        [(-1, r"malformed JSON")],
    ),
    ("empty-body", "/v1/events", JSON, b"", [(-1, r"malformed JSON")]),
    ("not-array-or-object", "/v1/events", JSON, b"17", [(-1, r"JSON array")]),
    ("empty-array", "/v1/events", JSON, b"[]", [(-1, r"empty batch")]),
    (
        "wrong-types",
        "/v1/events",
        JSON,
        j(
            [
                GOOD,
                "page view",
                {"ts": True, "site": "a.example"},
                {"ts": NOW_MS, "site": 5},
                {"ts": NOW_MS, "site": "a.example", "path": 3, "visitor": ["v"]},
                {"ts": 1.5e12 + 0.5, "site": "a.example"},
                {"ts": {"s": 1}, "site": "a.example"},
                GOOD,
            ]
        ),
        [
            (1, r"event: must be a JSON object, not string"),
            (2, r"ts: .*boolean"),
            (3, r"site: must be a string, not number"),
            (4, r"path: must be a string, not number; visitor: must be a string, not array"),
            (5, r"ts: epoch milliseconds must be a whole number"),
            (6, r"ts: .*not dict"),
        ],
    ),
    (
        "timestamps",
        "/v1/events",
        JSON,
        j(
            [
                {"ts": 0, "site": "a.example"},
                {"ts": "1970-01-01T00:00:00Z", "site": "a.example"},
                {"ts": 1_700_000_000, "site": "a.example"},  # seconds sent as milliseconds
                {"ts": TS_MIN_MS - 1, "site": "a.example"},
                {"ts": "3000-01-01T00:00:00Z", "site": "a.example"},
                {"ts": 32_503_680_000_000, "site": "a.example"},
                {"ts": 9_223_372_036_854_775_807, "site": "a.example"},
                {"ts": -1, "site": "a.example"},
                {"ts": TOO_LATE_MS, "site": "a.example"},
                {"ts": "yesterday", "site": "a.example"},
                {"ts": "2023-11-14T10:00:00", "site": "a.example"},
                {"ts": "2023-02-30T10:00:00Z", "site": "a.example"},
                {"ts": NOW_MS, "site": "a.example"},
            ]
        ),
        [
            (0, r"before 2000"),
            (1, r"before 2000"),
            (2, r"before 2000"),
            (3, r"before 2000"),
            (4, r"ahead of the server clock \(2023-11-14T22:13:20.000Z\)"),
            (5, r"ahead of the server clock"),
            (6, r"ahead of the server clock"),
            (7, r"before 2000"),
            (8, r"more than 300 s ahead of the server clock"),
            (9, r"not an RFC 3339 time"),
            (10, r"no zone offset"),
            (11, r"not an RFC 3339 time"),
        ],
    ),
    (
        "sites",
        "/v1/events",
        JSON,
        j(
            [
                {"ts": NOW_MS},
                {"ts": NOW_MS, "site": ""},
                {"ts": NOW_MS, "site": "https://a.example/page"},
                {"ts": NOW_MS, "site": "a.example:8080"},
                {"ts": NOW_MS, "site": "-bad.example"},
                {"ts": NOW_MS, "site": "x" * 300},
                {"ts": NOW_MS, "site": None},
                {"site": "two bad", "ts": "never"},
            ]
        ),
        [
            (0, r"site: missing"),
            (1, r"site: site is empty"),
            (2, r"site: .*not a valid host name"),
            (3, r"site: .*not a valid host name"),
            (4, r"site: .*not a valid host name"),
            (5, r"site: .*longer than 253"),
            (6, r"site: missing"),
            (7, r"site: .*not a valid host name; ts: not an RFC 3339 time"),
        ],
    ),
    (
        "ndjson-bad-lines",
        "/v1/events",
        NDJSON,
        b"\n".join(
            [
                j(GOOD),
                b"{not json",
                j([GOOD]),
                b"",
                j({"ts": 0, "site": "a.example"}),
                j(GOOD),
            ]
        ),
        [(1, r"malformed JSON"), (2, r"must be a JSON object, not array"), (4, r"before 2000")],
    ),
    ("ndjson-empty", "/v1/events", NDJSON, b"\n \n\n", [(-1, r"empty batch")]),
    ("ndjson-not-utf8", "/v1/events", NDJSON, j(GOOD) + b"\n\xff\xfe\n", [(1, r"not valid UTF-8")]),
    (
        "seed-bad-lines",
        "/v1/logs",
        TEXT,
        "\n".join(
            [
                "2023.11.14 07:20:39.595 taobao.com",
                "garbage",
                "2023.02.30 07:20:39 a.example",
                "2023.11.14 25:20:39 a.example",
                "1999.12.31 23:59:59 a.example",
                "2023.11.14 22:19:00 a.example",
                "2023.11.14 07:20:39",
                "2023.11.14 07:20:39 bad_site!",
            ]
        ).encode(),
        [
            (1, r"line: expected 'yyyy.mm.dd HH:MM:SS"),
            (2, r"ts: date 2023.02.30 does not exist"),
            (3, r"ts: time of day 25:20:39 is not valid"),
            (4, r"ts: .*before 2000"),
            (5, r"ts: .*ahead of the server clock"),
            (6, r"site: missing"),
            (7, r"site: .*not a valid host name"),
        ],
    ),
    ("seed-empty", "/v1/logs", TEXT, b"", [(-1, r"empty batch")]),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("route", "ctype", "body", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in REJECTED],
)
async def test_bad_batch_is_rejected_whole_listing_every_bad_item(
    client: httpx.AsyncClient,
    ingest: RecordingIngest,
    route: str,
    ctype: str,
    body: bytes,
    expected: list[tuple[int, str]],
) -> None:
    answer = await client.post(route, content=body, headers={"content-type": ctype})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/json"
    out = answer.json()
    assert out["error"].startswith("batch rejected: ")
    assert out["total_errors"] == len(expected)
    assert [e["position"] for e in out["errors"]] == [p for p, _ in expected]
    for error, (position, pattern) in zip(out["errors"], expected, strict=True):
        assert re.search(pattern, error["reason"]), (position, error["reason"])
    assert ingest.commits == [], "nothing of a rejected batch may reach the groups"
    await assert_still_serving(client, ingest)


SEED_LINE = b"2023.11.14 07:20:39 a.example\n"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("route", "ctype", "body", "at_limit"),
    [
        ("/v1/events", JSON, j([GOOD] * 4), j([GOOD] * 3)),
        ("/v1/events", NDJSON, b"\n".join([j(GOOD)] * 4), b"\n".join([j(GOOD)] * 3)),
        ("/v1/logs", TEXT, SEED_LINE * 4, SEED_LINE * 3),
    ],
    ids=["json", "ndjson", "seed"],
)
async def test_too_many_events_is_rejected(
    ingest: RecordingIngest, route: str, ctype: str, body: bytes, at_limit: bytes
) -> None:
    async with client_for(make_app(ingest=ingest, batch_events_max=3)) as client:
        answer = await client.post(route, content=body, headers={"content-type": ctype})
        assert answer.status_code == 422, answer.text
        out = answer.json()
        assert out["total_errors"] == 1
        assert out["errors"][0]["position"] == -1
        assert "batch has 4 events; at most 3 are allowed" in out["errors"][0]["reason"]
        assert ingest.commits == []
        answer = await client.post(route, content=at_limit, headers={"content-type": ctype})
        assert answer.json() == {"accepted": 3}


@pytest.mark.anyio
async def test_many_bad_items_are_capped_but_counted(
    client: httpx.AsyncClient, ingest: RecordingIngest
) -> None:
    answer = await client.post("/v1/events", json=[{"ts": 0, "site": "a.example"}] * 1500)
    assert answer.status_code == 422
    out = answer.json()
    assert out["total_errors"] == 1500
    assert len(out["errors"]) == 1000
    assert [e["position"] for e in out["errors"]] == list(range(1000))
    assert ingest.commits == []


BODY_MAX = 1024


def padded(size: int) -> bytes:
    """A valid one-event JSON body of exactly ``size`` bytes (JSON allows whitespace)."""
    body = j([GOOD])
    return body + b" " * (size - len(body))


async def chunks(body: bytes, size: int = 100) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_413(ingest: RecordingIngest, streamed: bool) -> None:
    async with client_for(make_app(ingest=ingest, body_bytes_max=BODY_MAX)) as client:

        async def post(body: bytes) -> httpx.Response:
            if streamed:
                request = client.build_request(
                    "POST", "/v1/events", content=chunks(body), headers={"content-type": JSON}
                )
                assert "content-length" not in request.headers
                assert request.headers["transfer-encoding"] == "chunked"
                return await client.send(request)
            return await client.post("/v1/events", content=body, headers={"content-type": JSON})

        answer = await post(padded(BODY_MAX + 1))
        assert answer.status_code == 413, answer.text
        assert answer.json() == {"error": f"body larger than {BODY_MAX} bytes"}
        answer = await post(padded(50 * BODY_MAX))
        assert answer.status_code == 413
        assert ingest.commits == []
        answer = await post(padded(BODY_MAX))
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"accepted": 1}
        assert len(ingest.events()) == 1
        text = (await client.get("/metrics")).text
        assert 'flowray_ingest_rejected_total{status="413"} 2.0' in text


@pytest.mark.anyio
async def test_oversized_seed_body_is_413(ingest: RecordingIngest) -> None:
    async with client_for(make_app(ingest=ingest, body_bytes_max=BODY_MAX)) as client:
        body = b"2023.11.14 07:20:39 a.example\n" * 100
        answer = await client.post("/v1/logs", content=body)
        assert answer.status_code == 413
        assert ingest.commits == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("route", "body"),
    [("/v1/events", j(BATCH)), ("/v1/logs", b"2023.11.14 07:20:39 a.example\n")],
    ids=["events", "logs"],
)
async def test_unavailable_group_is_503_with_retry_after(
    client: httpx.AsyncClient, ingest: RecordingIngest, route: str, body: bytes
) -> None:
    ingest.error = Unavailable("group 3 has no quorum", retry_after_s=7)
    answer = await client.post(route, content=body)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "7"
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": "group 3 has no quorum"}
    assert ingest.commits == []
    text = (await client.get("/metrics")).text
    assert 'flowray_ingest_rejected_total{status="503"} 1.0' in text
    assert "flowray_ingest_events_total 0.0" in text
    ingest.error = None
    await assert_still_serving(client, ingest)


# --------------------------------------------------------------------------- traffic


async def traffic(client: httpx.AsyncClient, site: str = SITE, **params: str) -> httpx.Response:
    return await client.get(f"/v1/sites/{site}/traffic", params=params)


def minute_label(start: str, i: int) -> str:
    moment = datetime.fromtimestamp(ms(start) / 1000 + 60 * i, tz=UTC)
    return moment.isoformat()


@pytest.mark.anyio
async def test_minute_series_is_dense(client: httpx.AsyncClient) -> None:
    answer = await traffic(
        client, start="2023-11-14T10:00:00Z", end="2023-11-14T10:10:00Z", interval="minute"
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    out = answer.json()
    assert out["site"] == SITE
    assert out["interval"] == "minute"
    assert out["tz"] == "UTC"
    assert [p["t"] for p in out["points"]] == [
        minute_label("2023-11-14T10:00:00+00:00", i) for i in range(10)
    ]
    assert out["points"][0]["t"] == "2023-11-14T10:00:00+00:00"
    assert [p["count"] for p in out["points"]] == [3, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert out["watermark"] is None
    assert all(p["provisional"] is True for p in out["points"])


@pytest.mark.anyio
async def test_interval_defaults_to_minute_and_site_is_normalized(
    client: httpx.AsyncClient,
) -> None:
    answer = await traffic(
        client, site="Shop.Example.", start="2023-11-14T11:58:00Z", end="2023-11-14T12:01:00Z"
    )
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["site"] == SITE
    assert [(p["t"][11:16], p["count"]) for p in out["points"]] == [
        ("11:58", 0),
        ("11:59", 4),
        ("12:00", 0),
    ]


@pytest.mark.anyio
async def test_hour_series_totals_equal_the_data(client: httpx.AsyncClient) -> None:
    answer = await traffic(client, start="2023-11-14", end="2023-11-15", interval="hour")
    assert answer.status_code == 200, answer.text
    points = answer.json()["points"]
    assert len(points) == 24
    assert points[0]["t"] == "2023-11-14T00:00:00+00:00"
    assert points[23]["t"] == "2023-11-14T23:00:00+00:00"
    counts = {p["t"][11:13]: p["count"] for p in points if p["count"]}
    assert counts == {"10": 4, "11": 4, "13": 2}
    assert sum(p["count"] for p in points) == 10


@pytest.mark.anyio
async def test_day_series(client: httpx.AsyncClient) -> None:
    answer = await traffic(client, start="2023-11-12", end="2023-11-16", interval="day")
    assert answer.status_code == 200, answer.text
    points = answer.json()["points"]
    assert [(p["t"], p["count"]) for p in points] == [
        ("2023-11-12T00:00:00+00:00", 0),
        ("2023-11-13T00:00:00+00:00", 1),
        ("2023-11-14T00:00:00+00:00", 10),
        ("2023-11-15T00:00:00+00:00", 0),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("interval", ["minute", "hour", "day"])
async def test_every_interval_sums_to_the_events_in_range(
    client: httpx.AsyncClient, interval: str
) -> None:
    answer = await traffic(client, start="2023-11-13", end="2023-11-15", interval=interval)
    assert answer.status_code == 200, answer.text
    points = answer.json()["points"]
    assert len(points) == {"minute": 2 * 1440, "hour": 48, "day": 2}[interval]
    assert sum(p["count"] for p in points) == 11


@pytest.mark.anyio
async def test_other_sites_and_empty_sites_do_not_leak(client: httpx.AsyncClient) -> None:
    params = {"start": "2023-11-14T10:00:00Z", "end": "2023-11-14T10:01:00Z"}
    other = (await traffic(client, site="other.example", **params)).json()
    assert [p["count"] for p in other["points"]] == [5]
    nobody = await traffic(client, site="nobody.example", **params, interval="hour")
    assert nobody.status_code == 200
    assert [p["count"] for p in nobody.json()["points"]] == [0]


@pytest.mark.anyio
async def test_kolkata_hours_start_at_half_past_utc(client: httpx.AsyncClient) -> None:
    answer = await traffic(
        client,
        start="2023-11-14T15:00:00",
        end="2023-11-14T20:00:00",
        interval="hour",
        tz="Asia/Kolkata",
    )
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["tz"] == "Asia/Kolkata"
    assert [(p["t"], p["count"]) for p in out["points"]] == [
        ("2023-11-14T15:00:00+05:30", 4),  # 09:30-10:30Z: 10:00 (3) and 10:07 (1)
        ("2023-11-14T16:00:00+05:30", 0),
        ("2023-11-14T17:00:00+05:30", 4),  # 11:30-12:30Z: 11:59 (4)
        ("2023-11-14T18:00:00+05:30", 2),  # 12:30-13:30Z: 13:15 (2)
        ("2023-11-14T19:00:00+05:30", 0),
    ]
    for point in out["points"]:
        assert datetime.fromisoformat(point["t"]).astimezone(UTC).minute == 30


@pytest.mark.anyio
async def test_kolkata_day_starts_at_local_midnight(client: httpx.AsyncClient) -> None:
    answer = await traffic(
        client, start="2023-11-14", end="2023-11-15", interval="day", tz="Asia/Kolkata"
    )
    assert answer.status_code == 200, answer.text
    # 2023-11-13T18:30Z .. 2023-11-14T18:30Z holds all 11 events of the site.
    assert [(p["t"], p["count"]) for p in answer.json()["points"]] == [
        ("2023-11-14T00:00:00+05:30", 11)
    ]


CSV_PARAMS = {"start": "2023-11-14T09:00:00Z", "end": "2023-11-14T14:00:00Z", "interval": "hour"}


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["format", "accept"])
async def test_csv_matches_json(client: httpx.AsyncClient, how: str) -> None:
    as_json = (await traffic(client, **CSV_PARAMS)).json()
    if how == "format":
        answer = await traffic(client, **CSV_PARAMS, format="csv")
    else:
        answer = await client.get(
            f"/v1/sites/{SITE}/traffic", params=CSV_PARAMS, headers={"accept": "text/csv"}
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    assert answer.text.startswith("t,count,provisional\n")
    rows = parse_csv(answer.text)
    assert rows == [
        {"t": p["t"], "count": str(p["count"]), "provisional": str(p["provisional"]).lower()}
        for p in as_json["points"]
    ]
    assert [int(r["count"]) for r in rows] == [0, 4, 4, 0, 2]


@pytest.mark.anyio
async def test_provisional_follows_the_watermark(
    own_client: httpx.AsyncClient, loaded: Warehouse
) -> None:
    client = own_client
    loaded.catalog.set_watermark(ms("2023-11-14T11:00:00+00:00"))
    out = (await traffic(client, **CSV_PARAMS)).json()
    assert out["watermark"] == "2023-11-14T11:00:00+00:00"
    assert [(p["t"][11:13], p["provisional"]) for p in out["points"]] == [
        ("09", False),
        ("10", False),
        ("11", True),
        ("12", True),
        ("13", True),
    ]
    kolkata = (await traffic(client, **CSV_PARAMS, tz="Asia/Kolkata")).json()
    assert kolkata["watermark"] == "2023-11-14T16:30:00+05:30"
    minutes = (
        await traffic(client, start="2023-11-14T10:58:00Z", end="2023-11-14T11:02:00Z")
    ).json()
    assert [p["provisional"] for p in minutes["points"]] == [False, False, True, True]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("watermark", "tz", "bucket"),
    [
        ("2023-11-14T11:30:00+00:00", "UTC", "2023-11-14T11:00:00+00:00"),
        ("2023-11-14T11:00:00+00:00", "Asia/Kolkata", "2023-11-14T16:00:00+05:30"),
    ],
    ids=["utc-mid-hour", "kolkata-half-hour"],
)
async def test_bucket_straddling_the_watermark_is_provisional(
    own_client: httpx.AsyncClient, loaded: Warehouse, watermark: str, tz: str, bucket: str
) -> None:
    client = own_client
    loaded.catalog.set_watermark(ms(watermark))
    out = (await traffic(client, **CSV_PARAMS, tz=tz)).json()
    by_label = {p["t"]: p["provisional"] for p in out["points"]}
    assert by_label[bucket] is True


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"start": "2023-11-14T10:00:00Z", "end": "2023-11-14T10:00:00Z"},
            "end must be after start",
        ),
        (
            {"start": "2023-11-14T11:00:00Z", "end": "2023-11-14T10:00:00Z"},
            "end must be after start",
        ),
        (
            {"start": "2023-11-14", "end": "2023-11-15", "interval": "year"},
            "interval must be one of minute, hour, day, week, month",
        ),
        (
            {"start": "2023-11-14", "end": "2023-11-15", "interval": ""},
            "interval must be one of minute, hour, day, week, month",
        ),
        (
            {"start": "2023-11-14", "end": "2023-11-15", "tz": "Mars/Olympus_Mons"},
            "unknown time zone 'Mars/Olympus_Mons'",
        ),
        (
            {"start": "2023-11-14", "end": "2023-11-15", "tz": "../../etc/passwd"},
            "unknown time zone",
        ),
        ({"start": "yesterday", "end": "2023-11-15"}, "invalid time 'yesterday'"),
        ({"start": "2023-11-14", "end": "2300-01-01"}, "outside 1970-01-01 .. 2200-01-01"),
        (
            {"start": "2023-10-01", "end": "2023-11-14"},
            "range of 44 days exceeds the limit of 31 days for interval 'minute'",
        ),
        (
            {"start": "2020-01-01", "end": "2023-11-14", "interval": "hour"},
            "exceeds the limit of 1098 days for interval 'hour'",
        ),
        (
            {"start": "2023-11-14", "end": "2023-11-15", "format": "xml"},
            "format must be json or csv",
        ),
    ],
)
async def test_bad_query_is_422_with_a_clear_error(
    client: httpx.AsyncClient, params: dict[str, str], message: str
) -> None:
    answer = await traffic(client, **params)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert message in answer.json()["error"]
    assert (await traffic(client, start="2023-11-14", end="2023-11-15")).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("site", ["bad_site!", "-x.example", "a..example", "%20", "é" * 300])
async def test_invalid_site_is_422(client: httpx.AsyncClient, site: str) -> None:
    answer = await traffic(client, site=site, start="2023-11-14", end="2023-11-15")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"].startswith("site")


@pytest.mark.anyio
async def test_missing_parameters_are_422_naming_them(client: httpx.AsyncClient) -> None:
    answer = await client.get(f"/v1/sites/{SITE}/traffic")
    assert answer.status_code == 422
    out = answer.json()
    assert out["error"] == "invalid request"
    assert {d["field"] for d in out["details"]} == {"query.start", "query.end"}


@pytest.mark.anyio
async def test_longest_allowed_range_is_served(client: httpx.AsyncClient) -> None:
    answer = await traffic(client, start="2023-10-14T00:00:00Z", end="2023-11-14T00:00:00Z")
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["points"]) == 31 * 1440


# --------------------------------------------------------------------------- cache


@pytest.fixture(params=["memory", "redis"])
def cache_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_repeat_query_is_served_from_cache_and_publish_invalidates(
    loaded: Warehouse, cache_kind: str, request: pytest.FixtureRequest, unique: str
) -> None:
    if cache_kind == "redis":
        url = request.getfixturevalue("real_redis_url")
        inner: Cache = RedisCache(url, timeout_s=0.5, prefix=f"flowray-test-{unique}:")
    else:
        inner = MemoryCache()
    cache = CountingCache(inner)
    params = {"start": "2023-11-14", "end": "2023-11-15", "interval": "hour"}
    try:
        async with client_for(make_app(warehouse=loaded, cache=cache)) as client:
            first = await traffic(client, **params)
            assert (cache.gets, cache.hits, cache.sets) == (1, 0, 1)
            second = await traffic(client, **params)
            assert (cache.gets, cache.hits, cache.sets) == (2, 1, 1)
            assert second.content == first.content
            assert second.headers["content-type"] == "application/json"
            metrics = (await client.get("/metrics")).text
            assert 'flowray_queries_total{cache="hit"} 1.0' in metrics
            assert 'flowray_queries_total{cache="miss"} 1.0' in metrics

            # CSV of the same query is a different answer, so a different entry.
            csv_answer = await traffic(client, **params, format="csv")
            assert csv_answer.text.startswith("t,count,provisional\n")
            assert cache.hits == 1

            # New data in a new hour: the next answer must include it.
            publish(loaded, [(SITE, "2023-11-14T20:05:00+00:00")] * 3, "job2")
            third = (await traffic(client, **params)).json()
            assert cache.hits == 1
            assert sum(p["count"] for p in third["points"]) == 13
            assert third["points"][20]["count"] == 3

            # Re-processing replaces a unit: the new count shows, not the cached one.
            publish(loaded, [(SITE, "2023-11-14T20:06:00+00:00")], "job3")
            fourth = (await traffic(client, **params)).json()
            assert third["points"][20]["count"] == 3
            assert fourth["points"][20]["count"] == 1

            # A watermark move changes "provisional": it must not be served stale either.
            loaded.catalog.set_watermark(ms("2023-11-14T12:00:00+00:00"))
            fifth = (await traffic(client, **params)).json()
            assert fifth["watermark"] == "2023-11-14T12:00:00+00:00"
            assert [p["provisional"] for p in fifth["points"]] == [False] * 12 + [True] * 12
            again = (await traffic(client, **params)).json()
            assert again == fifth
            assert cache.hits == 2
    finally:
        await cache.close()


@pytest.mark.anyio
async def test_warehouses_sharing_a_redis_never_see_each_others_answers(
    tmp_path: Path, real_redis_url: str, unique: str
) -> None:
    """Two clusters on one Redis (or one cluster after its data directory was wiped).

    Both warehouses are at generation 1, so only the per-warehouse prefix that the Serve
    deployment builds from the catalog identity keeps their cached answers apart.
    """
    params = {"start": "2023-11-14", "end": "2023-11-15", "interval": "day"}
    first = Warehouse(tmp_path / "first", SHARD_MAP.shard_count)
    second = Warehouse(tmp_path / "second", SHARD_MAP.shard_count)
    assert publish(first, [(SITE, "2023-11-14T10:00:00+00:00")] * 2, "a") == 1
    assert publish(second, [(SITE, "2023-11-14T10:00:00+00:00")] * 7, "b") == 1
    assert first.catalog.identity != second.catalog.identity
    reopened = Warehouse(tmp_path / "first", SHARD_MAP.shard_count)
    assert reopened.catalog.identity == first.catalog.identity  # survives a restart
    reopened.catalog.close()
    caches = [
        RedisCache(real_redis_url, 0.5, f"flowray-test-{unique}:{w.catalog.identity}:")
        for w in (first, second)
    ]
    try:
        counts = []
        for warehouse, cache in zip((first, second), caches, strict=True):
            async with client_for(make_app(warehouse=warehouse, cache=cache)) as client:
                counts.append((await traffic(client, **params)).json()["points"][0]["count"])
        assert counts == [2, 7]
    finally:
        for cache in caches:
            await cache.close()
        first.catalog.close()
        second.catalog.close()


@pytest.mark.anyio
async def test_query_key_is_the_normalized_site(loaded: Warehouse) -> None:
    cache = CountingCache(MemoryCache())
    async with client_for(make_app(warehouse=loaded, cache=cache)) as client:
        params = {"start": "2023-11-14", "end": "2023-11-15", "interval": "day"}
        await traffic(client, site="shop.example", **params)
        answer = await traffic(client, site="SHOP.example.", **params)
        assert answer.json()["points"][0]["count"] == 10
        assert cache.hits == 1


# --------------------------------------------------------------------------- the rest


@pytest.mark.anyio
async def test_healthz(client: httpx.AsyncClient) -> None:
    answer = await client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "cache": "memory", "pid": os.getpid()}


@pytest.mark.anyio
async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert "# TYPE flowray_ingest_events_total counter" in text
    assert "flowray_ingest_events_total 0.0" in text
    for name in ("flowray_ingest_commit_seconds", "flowray_query_seconds"):
        assert f"# TYPE {name} histogram" in text


@pytest.mark.anyio
async def test_metrics_are_per_app(loaded: Warehouse) -> None:
    """Two apps in one process (tests, several Serve replicas) do not share counters."""
    async with client_for(make_app(warehouse=loaded)) as one:
        await one.post("/v1/events", json=GOOD)
    async with client_for(make_app(warehouse=loaded)) as two:
        assert "flowray_ingest_events_total 0.0" in (await two.get("/metrics")).text


@pytest.mark.anyio
async def test_openapi_lists_every_route(client: httpx.AsyncClient) -> None:
    answer = await client.get("/openapi.json")
    assert answer.status_code == 200
    spec = answer.json()
    assert spec["info"]["title"] == "flowray"
    assert set(spec["paths"]) == ROUTES
    assert set(spec["paths"]["/v1/events"]["post"]["responses"]) >= {"200", "413", "422", "503"}
    params = {p["name"] for p in spec["paths"]["/v1/sites/{site}/traffic"]["get"]["parameters"]}
    assert params == {"site", "start", "end", "interval", "tz", "format"}
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text
    assert "/openapi.json" in docs.text


def test_routes_and_documented_routes_agree() -> None:
    """Every route of every router the app includes (OpenAPI lists them with their
    prefixes; FastAPI keeps included routers whole in app.routes) and any route added
    to the app directly."""
    app = make_app()
    paths = set(app.openapi()["paths"])
    paths |= {r.path for r in app.routes if isinstance(r, APIRoute)}
    assert paths == ROUTES


@pytest.mark.anyio
async def test_dashboard_is_html_calling_the_api(client: httpx.AsyncClient) -> None:
    answer = await client.get("/")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.text.lstrip().lower().startswith("<!doctype html>")
    assert "/v1/sites/" in answer.text
    assert "http://" not in answer.text and "https://" not in answer.text  # no CDN


@pytest.mark.anyio
async def test_admin_status_and_process(ingest: RecordingIngest) -> None:
    admin = FakeAdmin()
    async with client_for(make_app(ingest=ingest, admin=admin)) as client:
        status = await client.get("/v1/admin/status")
        assert status.json() == {"groups": [{"group": 0, "master": 0}], "cache": "memory"}
        assert (await client.post("/v1/admin/process")).json() == {"mode": "closed", "units": 0}
        assert (await client.post("/v1/admin/process", params={"mode": "all"})).status_code == 200
        bad = await client.post("/v1/admin/process", params={"mode": "everything"})
        assert bad.status_code == 422
        assert bad.json() == {"error": "mode must be one of due, closed, all"}
        assert admin.modes == ["closed", "all"]
        admin.error = Unavailable("processor restarting", retry_after_s=2)
        busy = await client.post("/v1/admin/process", params={"mode": "due"})
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "2"
        assert busy.json() == {"error": "processor restarting"}


@pytest.mark.anyio
async def test_reprocess_rollback_and_job_routes() -> None:
    admin = FakeAdmin()
    body = {
        "start": "2020-03-14T08:00",
        "end": "2020-03-15",
        "tz": "Asia/Kolkata",
        "sites": ["Shop.Example."],
        "logic": "no-bots",
        "logic_modules": ["mylogic"],
        "dry_run": True,
    }
    async with client_for(make_app(admin=admin)) as client:
        early = await client.post("/v1/admin/reprocess", json={**body, "end": "2020-03-14"})
        assert early.status_code == 422  # end before start, in the zone given
        started = await client.post("/v1/admin/reprocess", json=body)
        assert started.status_code == 202, started.text
        assert admin.requests == [
            {
                "start_ms": ms("2020-03-14T08:00:00+05:30"),
                "end_ms": ms("2020-03-15T00:00:00+05:30"),
                "sites": ["shop.example"],
                "logic": "no-bots",
                "modules": ["mylogic"],
                "dry_run": True,
            }
        ]
        job = (await client.get(f"/v1/admin/jobs/{started.json()['job']}")).json()
        assert job["state"] == "done" and job["kind"] == "reprocess"
        assert (await client.get("/v1/admin/jobs/nope")).status_code == 404
        for body in (
            {"start": "2020-03-14", "end": "2020-03-15", "tz": "Mars/Base"},
            {"start": "2020-03-14", "end": "2020-03-15", "sites": ["not a site!"]},
            {"start": "yesterday", "end": "2020-03-15"},
            {"start": "2020-03-14", "end": "2020-03-15", "surprise": 1},
        ):
            bad = await client.post("/v1/admin/reprocess", json=body)
            assert bad.status_code == 422, body
        assert (await client.post("/v1/admin/rollback")).status_code == 202
        bad = await client.post("/v1/admin/rollback", params={"to": 5})
        assert bad.status_code == 422 and bad.json() == {"error": "no warehouse version 5"}
        versions = await client.get("/v1/admin/versions")
        assert versions.json() == [{"version": 1, "logic": "default", "current": True}]
        restart = await client.post("/v1/admin/restart")
        assert restart.status_code == 202 and restart.json()["kind"] == "restart"
        moved = await client.post("/v1/admin/shards/3/move", params={"to": 0})
        assert moved.json() == {"shard": 3, "from_group": 1, "to_group": 0}
        bad = await client.post("/v1/admin/shards/9/move", params={"to": 0})
        assert bad.status_code == 422 and "no shard 9" in bad.json()["error"]
        again = await client.post("/v1/admin/restart")
        assert again.status_code == 409 and "already running" in again.json()["error"]


# --------------------------------------------------------------------------- single flight


class SlowWarehouse:
    """A real warehouse whose queries take a while, counting how many really ran."""

    def __init__(self, inner: Warehouse, delay_s: float) -> None:
        self.inner, self.delay_s, self.queries = inner, delay_s, 0

    def snapshot(self) -> tuple[int, int, int | None]:
        return self.inner.snapshot()

    def minutes(self, site: str, start_ms: int, end_ms: int, version: int) -> Any:
        self.queries += 1
        time.sleep(self.delay_s)
        return self.inner.minutes(site, start_ms, end_ms, version)


@pytest.mark.anyio
async def test_concurrent_identical_misses_run_one_query(shared: Warehouse) -> None:
    slow = SlowWarehouse(shared, 0.3)
    async with client_for(make_app(warehouse=slow)) as c:
        answers = await asyncio.gather(
            *(
                traffic(c, start="2023-11-14T10:00:00Z", end="2023-11-14T11:00:00Z")
                for _ in range(10)
            )
        )
        assert {a.status_code for a in answers} == {200}
        assert len({a.content for a in answers}) == 1
        assert slow.queries == 1, f"{slow.queries} warehouse queries for 10 identical misses"
        metrics = (await c.get("/metrics")).text
        assert "flowray_query_joined_total 9.0" in metrics


@pytest.mark.anyio
async def test_a_query_slower_than_the_timeout_is_503(shared: Warehouse) -> None:
    slow = SlowWarehouse(shared, 1.5)
    async with client_for(make_app(warehouse=slow, query_timeout_s=0.2)) as c:
        r = await traffic(c, start="2023-11-14T10:00:00Z", end="2023-11-14T11:00:00Z")
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert "longer than" in r.json()["error"]


@pytest.mark.anyio
async def test_queries_answer_when_redis_is_down(shared: Warehouse) -> None:
    from flowray.query.cache import RedisCache
    from tests.conftest import free_port

    dead = RedisCache(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.05)
    async with client_for(make_app(warehouse=shared, cache=dead)) as c:
        started = time.perf_counter()
        r = await traffic(c, start="2023-11-14T10:00:00Z", end="2023-11-14T11:00:00Z")
        assert r.status_code == 200
        assert sum(p["count"] for p in r.json()["points"]) == 4
        assert time.perf_counter() - started < 5
    assert dead.errors >= 2  # the get and the set both failed, and neither broke the query


class StatusAdmin(FakeAdmin):
    async def status(self) -> dict[str, Any]:
        return {
            "groups": [
                {
                    "group": 0,
                    "replicas": [
                        {
                            "replica": 0,
                            "role": "master",
                            "term": 4,
                            "last_index": 50,
                            "commit_index": 48,
                            "abstaining": False,
                            "sealed_pending": 2,
                            "blocks_open": 3,
                            "late_events": 7,
                        },
                        {
                            "replica": 1,
                            "role": "follower",
                            "term": 4,
                            "last_index": 47,
                            "commit_index": 46,
                            "abstaining": True,
                        },
                        {"replica": 2, "status": "down", "group": 0},
                    ],
                },
                {
                    "group": 1,
                    "replicas": [
                        {"replica": 0, "role": "candidate", "term": 9, "last_index": 5},
                        {"replica": 1, "role": "master", "term": 8, "last_index": 5},
                        {"replica": 2, "status": "down", "group": 1},
                    ],
                },
            ],
            "processor": {"jobs": 4, "last_job": {"seconds": 1.5}},
        }


class ChangingAdmin(FakeAdmin):
    def __init__(self) -> None:
        self.down = False

    async def status(self) -> dict[str, Any]:
        second = (
            {"replica": 1, "status": "down"}
            if self.down
            else {"replica": 1, "role": "follower", "term": 2, "last_index": 9, "commit_index": 9}
        )
        master = {"replica": 0, "role": "master", "term": 2, "last_index": 9, "commit_index": 9}
        return {"groups": [{"group": 0, "replicas": [master, second]}]}


@pytest.mark.anyio
async def test_a_replica_gone_down_leaves_no_stale_series(shared: Warehouse) -> None:
    admin = ChangingAdmin()
    async with client_for(make_app(warehouse=shared, admin=admin)) as c:
        text = (await c.get("/metrics")).text
        assert 'flowray_replica_commit_index{group="0",replica="1"} 9.0' in text
        admin.down = True
        text = (await c.get("/metrics")).text
    assert 'flowray_replica_up{group="0",replica="1"} 0.0' in text
    for series in ("commit_index", "abstaining"):
        assert f'flowray_replica_{series}{{group="0",replica="1"}}' not in text
    assert 'flowray_replication_lag_entries{group="0",replica="1"}' not in text
    assert 'flowray_replica_commit_index{group="0",replica="0"} 9.0' in text


@pytest.mark.anyio
async def test_metrics_show_the_cluster(shared: Warehouse) -> None:
    async with client_for(make_app(warehouse=shared, admin=StatusAdmin())) as c:
        text = (await c.get("/metrics")).text
    assert 'flowray_replication_lag_entries{group="0",replica="1"} 3.0' in text
    assert 'flowray_replication_lag_entries{group="0",replica="0"} 0.0' in text
    assert 'flowray_replica_up{group="0",replica="2"} 0.0' in text
    # Failover: the term, whether the group has a master, which replica it is.
    assert 'flowray_group_term{group="0"} 4.0' in text
    assert 'flowray_group_term{group="1"} 9.0' in text
    assert 'flowray_group_has_master{group="0"} 1.0' in text
    assert 'flowray_group_has_master{group="1"} 0.0' in text
    assert 'flowray_replica_is_master{group="0",replica="0"} 1.0' in text
    assert 'flowray_replica_is_master{group="0",replica="1"} 0.0' in text
    assert 'flowray_replica_is_master{group="1",replica="0"} 0.0' in text
    # A master of an older term (cut off, being replaced) is no master.
    assert 'flowray_replica_is_master{group="1",replica="1"} 0.0' in text
    assert 'flowray_replica_commit_index{group="0",replica="0"} 48.0' in text
    assert 'flowray_replica_abstaining{group="0",replica="1"} 1.0' in text
    assert 'flowray_replica_abstaining{group="0",replica="0"} 0.0' in text
    assert 'flowray_blocks_pending{group="0"} 2.0' in text
    assert 'flowray_blocks_open{group="0"} 3.0' in text
    assert 'flowray_late_events{group="0"} 7.0' in text
    assert "flowray_processing_jobs 4.0" in text
    assert "flowray_processing_last_job_seconds 1.5" in text
