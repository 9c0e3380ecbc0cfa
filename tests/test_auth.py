"""Scoped access tokens: the store, the rules, the app's answers and the CLI.

The app is driven in-process through ``httpx.ASGITransport``, as in test_app.py: ingest
goes to a fake that records what would be committed, queries to a real small warehouse,
and tokens to a real SQLite store in ``tmp_path``. The authorizer's clock is a fake the
test moves, so the store's reload interval and the rate limits are exact.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from flowray.api.app import create_app
from flowray.api.auth import (
    RELOAD_S,
    Authorizer,
    Grant,
    StoreUnavailable,
    TokenBucket,
    TokenRecord,
    TokenStore,
    allow_sites,
    bearer_token,
    check_grant,
)
from flowray.cli import app as cli_app
from flowray.config import Settings
from flowray.core.router import ShardMap
from flowray.ingest.events import EVENT_SCHEMA
from flowray.ingest.pieces import GroupEvents, Piece, from_ipc, split_batch
from flowray.query.cache import MemoryCache
from flowray.tasks.mapreduce import map_block_slices, reduce_partials, write_units
from flowray.warehouse.files import Warehouse
from tests.fakes import FakeAdmin, as_pieces, client_for

NOW_S = 1_700_000_000.0  # 2023-11-14T22:13:20Z, the server clock of ingest
NOW_MS = int(NOW_S * 1000)
SHARD_MAP = ShardMap.round_robin(4, 2)
REDUCE_KEYS = 2
SHOP, OTHER = "shop.example", "other.example"
ADMIN_SECRET = "s3cret-admin-token-from-the-environment"
HOUR = "start=2023-11-14T10:00:00Z&end=2023-11-14T11:00:00Z&interval=hour"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- fakes


class RecordingIngest:
    """Records every committed batch of pieces."""

    def __init__(self) -> None:
        self.commits: list[dict[int, list[Piece]]] = []

    async def commit(self, groups: dict[int, GroupEvents]) -> None:
        pieces = as_pieces(groups, SHARD_MAP.shard_count)
        self.commits.append(pieces)

    def sites(self) -> list[str]:
        return [
            row["site"]
            for batch in self.commits
            for pieces in batch.values()
            for piece in pieces
            for row in from_ipc(piece.payload).to_pylist()
        ]


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class BrokenSource:
    def active(self) -> list[TokenRecord]:
        raise StoreUnavailable("disk on fire")


# --------------------------------------------------------------------------- app


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warehouse]:
    """3 events of SHOP and 5 of OTHER in the hour 2023-11-14T10."""
    wh = Warehouse(tmp_path_factory.mktemp("auth") / "warehouse", SHARD_MAP.shard_count)
    ts = 1_699_956_000_000  # 2023-11-14T10:00:00Z
    rows = [{"ts": ts + i, "site": SHOP} for i in range(3)]
    rows += [{"ts": ts + i, "site": OTHER} for i in range(5)]
    pieces = [
        p
        for ps in split_batch(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), SHARD_MAP).values()
        for p in ps
    ]
    blocks = [(p.shard, p.hour) for p in pieces]
    partials = map_block_slices(blocks, [[p.payload] for p in pieces], "default", REDUCE_KEYS)
    reduced = [reduce_partials([partials[k]]) for k in range(REDUCE_KEYS)]
    units = write_units(wh.root, "default", "job1", reduced, [(s, h, 1) for s, h in blocks])
    wh.catalog.publish(units, {})
    yield wh
    wh.catalog.close()


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "data" / "tokens.sqlite")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ingest() -> RecordingIngest:
    return RecordingIngest()


@pytest.fixture
def admin() -> FakeAdmin:
    return FakeAdmin()


def make_app(
    warehouse: Warehouse,
    ingest: RecordingIngest,
    admin: FakeAdmin,
    authorizer: Authorizer | None,
) -> FastAPI:
    return create_app(
        settings=Settings(shards=SHARD_MAP.shard_count, groups=SHARD_MAP.group_count),
        shard_map=SHARD_MAP,
        ingest=ingest,
        warehouse=warehouse,
        admin=admin,
        cache=MemoryCache(),
        clock=lambda: NOW_S,
        authorizer=authorizer,
    )


@pytest.fixture
def authorizer(store: TokenStore, clock: FakeClock) -> Authorizer:
    return Authorizer(store, mode="auto", clock=clock)


@pytest.fixture
async def client(
    warehouse: Warehouse,
    ingest: RecordingIngest,
    admin: FakeAdmin,
    authorizer: Authorizer,
    front: str,
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(warehouse, ingest, admin, authorizer), front) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def event(site: str) -> dict[str, Any]:
    return {"ts": NOW_MS - 1000, "site": site}


async def count(client: httpx.AsyncClient, site: str, token: str | None) -> httpx.Response:
    headers = bearer(token) if token else {}
    return await client.get(f"/v1/sites/{site}/traffic?{HOUR}", headers=headers)


OPEN_PATHS = ["/healthz", "/metrics", "/docs", "/openapi.json", "/"]


# --------------------------------------------------------------------------- modes


@pytest.mark.anyio
async def test_without_an_authorizer_everything_is_open(
    warehouse: Warehouse, ingest: RecordingIngest, admin: FakeAdmin
) -> None:
    async with client_for(make_app(warehouse, ingest, admin, None)) as c:
        assert (await c.post("/v1/events", json=[event(SHOP), event(OTHER)])).status_code == 200
        assert (await count(c, OTHER, None)).json()["points"][0]["count"] == 5
        assert (await c.post("/v1/admin/process")).status_code == 200
        assert "securitySchemes" not in json.dumps((await c.get("/openapi.json")).json())


@pytest.mark.anyio
async def test_auto_is_open_while_no_token_exists(
    client: httpx.AsyncClient, store: TokenStore, ingest: RecordingIngest
) -> None:
    assert (await client.post("/v1/events", json=event(OTHER))).status_code == 200
    assert (await count(client, OTHER, None)).status_code == 200
    assert (await client.get("/v1/admin/status")).status_code == 200
    assert not store.path.exists(), "reading the store must not create it"
    assert ingest.sites() == [OTHER]


@pytest.mark.anyio
async def test_auto_switches_on_once_a_token_exists(
    client: httpx.AsyncClient, store: TokenStore, clock: FakeClock
) -> None:
    assert (await count(client, SHOP, None)).status_code == 200
    token, _ = store.create("read", [SHOP])
    clock.advance(RELOAD_S)
    answer = await count(client, SHOP, None)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert "token" in answer.json()["error"]
    assert (await count(client, SHOP, token)).status_code == 200


@pytest.mark.anyio
async def test_auto_with_an_admin_token_from_the_environment_is_enforced(
    warehouse: Warehouse, ingest: RecordingIngest, admin: FakeAdmin, store: TokenStore
) -> None:
    authorizer = Authorizer(store, mode="auto", admin_token=ADMIN_SECRET)
    async with client_for(make_app(warehouse, ingest, admin, authorizer)) as c:
        assert (await count(c, SHOP, None)).status_code == 401
        assert (await count(c, SHOP, ADMIN_SECRET)).status_code == 200


@pytest.mark.anyio
async def test_on_demands_tokens_with_an_empty_store_and_off_never(
    warehouse: Warehouse, ingest: RecordingIngest, admin: FakeAdmin, store: TokenStore
) -> None:
    async with client_for(make_app(warehouse, ingest, admin, Authorizer(store, mode="on"))) as c:
        assert (await c.post("/v1/events", json=event(SHOP))).status_code == 401
    store.create("read", [SHOP])
    async with client_for(make_app(warehouse, ingest, admin, Authorizer(store, mode="off"))) as c:
        assert (await count(c, OTHER, None)).status_code == 200
    with pytest.raises(ValueError, match="auth must be one of"):
        Authorizer(store, mode="maybe")


@pytest.mark.anyio
async def test_an_unreadable_store_fails_closed_in_auto_mode(
    warehouse: Warehouse, ingest: RecordingIngest, admin: FakeAdmin
) -> None:
    authorizer = Authorizer(BrokenSource(), mode="auto")
    async with client_for(make_app(warehouse, ingest, admin, authorizer)) as c:
        assert (await count(c, SHOP, None)).status_code == 401
        assert (await c.get("/healthz")).status_code == 200


# --------------------------------------------------------------------------- 401


@pytest.mark.anyio
@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer fr_not-a-token-anyone-made",
        "Bearer not-even-the-prefix",
    ],
)
async def test_missing_or_unknown_tokens_get_401(
    client: httpx.AsyncClient, store: TokenStore, clock: FakeClock, header: str | None
) -> None:
    store.create("admin")
    clock.advance(RELOAD_S)
    headers = {} if header is None else {"Authorization": header}
    for method, path in [
        ("POST", "/v1/events"),
        ("POST", "/v1/logs"),
        ("GET", f"/v1/sites/{SHOP}/traffic?{HOUR}"),
        ("GET", "/v1/admin/status"),
        ("POST", "/v1/admin/process"),
    ]:
        answer = await client.request(method, path, headers=headers, content=b"[]")
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert answer.json()["error"]


@pytest.mark.anyio
async def test_open_routes_need_no_token(
    client: httpx.AsyncClient, store: TokenStore, clock: FakeClock
) -> None:
    store.create("admin")
    clock.advance(RELOAD_S)
    for path in OPEN_PATHS:
        assert (await client.get(path)).status_code == 200, path


@pytest.mark.anyio
async def test_openapi_shows_bearer_auth_on_guarded_routes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert [s["scheme"].lower() for s in schemes.values()] == ["bearer"]
    assert spec["paths"]["/v1/events"]["post"]["security"]
    assert spec["paths"]["/v1/admin/process"]["post"]["security"]
    assert "security" not in spec["paths"]["/healthz"]["get"]


# --------------------------------------------------------------------------- read


@pytest.mark.anyio
async def test_read_token_sees_its_site_however_it_is_spelled(
    client: httpx.AsyncClient, store: TokenStore
) -> None:
    token, _ = store.create("read", ["Shop.Example."])
    for spelled in [SHOP, "SHOP.example", "shop.example.", "shop%2Eexample"]:
        answer = await count(client, spelled, token)
        assert answer.status_code == 200, (spelled, answer.text)
        assert answer.json()["site"] == SHOP
        assert answer.json()["points"][0]["count"] == 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    "spelled", [OTHER, "OTHER.example", "other.example.", "other%2Eexample", "%6Fther.example"]
)
async def test_read_token_never_sees_another_site(
    client: httpx.AsyncClient, store: TokenStore, spelled: str
) -> None:
    token, record = store.create("read", [SHOP])
    for fmt in ("json", "csv"):
        answer = await client.get(
            f"/v1/sites/{spelled}/traffic?{HOUR}&format={fmt}", headers=bearer(token)
        )
        assert answer.status_code == 403, (spelled, answer.text)
        assert answer.json()["forbidden_sites"] == [OTHER]
        assert record.id in answer.json()["error"]
        assert '"count"' not in answer.text and "t,count" not in answer.text


@pytest.mark.anyio
async def test_cached_answers_are_not_shared_across_sites(
    client: httpx.AsyncClient, store: TokenStore
) -> None:
    """A query another token warmed in the cache is still refused to a read token."""
    admin_token, _ = store.create("admin")
    token, _ = store.create("read", [SHOP])
    assert (await count(client, OTHER, admin_token)).status_code == 200
    assert (await count(client, OTHER, token)).status_code == 403


@pytest.mark.anyio
async def test_read_token_may_not_ingest_or_administer(
    client: httpx.AsyncClient, store: TokenStore, ingest: RecordingIngest, admin: FakeAdmin
) -> None:
    token, _ = store.create("read", [SHOP])
    assert (
        await client.post("/v1/events", json=event(SHOP), headers=bearer(token))
    ).status_code == 403
    assert (await client.get("/v1/admin/status", headers=bearer(token))).status_code == 403
    answer = await client.post("/v1/admin/process", headers=bearer(token))
    assert answer.status_code == 403
    assert "needs admin" in answer.json()["error"]
    assert ingest.commits == [] and admin.modes == []


# --------------------------------------------------------------------------- ingest


@pytest.mark.anyio
async def test_ingest_token_writes_its_sites(
    client: httpx.AsyncClient, store: TokenStore, ingest: RecordingIngest
) -> None:
    token, _ = store.create("ingest", [SHOP, "blog.example"])
    auth = bearer(token)
    answer = await client.post(
        "/v1/events", json=[event("Shop.Example."), event("blog.example")], headers=auth
    )
    assert answer.json() == {"accepted": 2}
    ndjson = json.dumps(event(SHOP)).encode()
    answer = await client.post(
        "/v1/events", content=ndjson, headers={**auth, "Content-Type": "application/x-ndjson"}
    )
    assert answer.json() == {"accepted": 1}
    lines = b"2023.11.14 10:00:00.000 shop.example\n"
    answer = await client.post(
        "/v1/logs", content=lines, headers={**auth, "Content-Type": "text/plain"}
    )
    assert answer.json() == {"accepted": 1}
    assert sorted(ingest.sites()) == ["blog.example", SHOP, SHOP, SHOP]


@pytest.mark.anyio
async def test_ingest_batch_with_another_site_is_rejected_whole(
    client: httpx.AsyncClient, store: TokenStore, ingest: RecordingIngest
) -> None:
    token, _ = store.create("ingest", [SHOP])
    batch = [event(SHOP), event("OTHER.example"), event(SHOP), event("third.example")]
    answer = await client.post("/v1/events", json=batch, headers=bearer(token))
    assert answer.status_code == 403
    assert answer.json()["forbidden_sites"] == [OTHER, "third.example"]
    lines = b"2023.11.14 10:00:00.000 shop.example\n2023.11.14 10:00:00.000 other.example\n"
    answer = await client.post("/v1/logs", content=lines, headers=bearer(token))
    assert answer.status_code == 403
    assert ingest.commits == [], "nothing of a refused batch may be stored"


@pytest.mark.anyio
async def test_ingest_token_may_not_read_or_administer(
    client: httpx.AsyncClient, store: TokenStore
) -> None:
    token, _ = store.create("ingest", [SHOP])
    assert (await count(client, SHOP, token)).status_code == 403
    assert (await client.get("/v1/admin/status", headers=bearer(token))).status_code == 403


# --------------------------------------------------------------------------- admin


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["store", "environment"])
async def test_admin_tokens_may_do_everything(
    warehouse: Warehouse,
    ingest: RecordingIngest,
    admin: FakeAdmin,
    store: TokenStore,
    source: str,
) -> None:
    store.create("read", [SHOP])  # auth is on either way
    token = store.create("admin")[0] if source == "store" else ADMIN_SECRET
    authorizer = Authorizer(store, admin_token=ADMIN_SECRET)
    async with client_for(make_app(warehouse, ingest, admin, authorizer)) as c:
        auth = bearer(token)
        answer = await c.post("/v1/events", json=[event(SHOP), event(OTHER)], headers=auth)
        assert answer.json() == {"accepted": 2}
        assert (await count(c, OTHER, token)).json()["points"][0]["count"] == 5
        assert (await c.get("/v1/admin/status", headers=auth)).status_code == 200
        answer = await c.post("/v1/admin/process?mode=all", headers=auth)
        assert answer.json() == {"mode": "all", "units": 0}
    assert admin.modes == ["all"]


@pytest.mark.anyio
async def test_environment_admin_token_must_match_exactly(
    warehouse: Warehouse, ingest: RecordingIngest, admin: FakeAdmin, store: TokenStore
) -> None:
    authorizer = Authorizer(store, admin_token=ADMIN_SECRET)
    async with client_for(make_app(warehouse, ingest, admin, authorizer)) as c:
        for wrong in [ADMIN_SECRET[:-1], ADMIN_SECRET + "x", ADMIN_SECRET.upper()]:
            assert (await c.get("/v1/admin/status", headers=bearer(wrong))).status_code == 401


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.anyio
async def test_revocation_takes_effect_within_the_reload_interval(
    client: httpx.AsyncClient, store: TokenStore, clock: FakeClock
) -> None:
    token, record = store.create("read", [SHOP])
    keep, _ = store.create("read", [SHOP])
    assert (await count(client, SHOP, token)).status_code == 200
    revoked = store.revoke(record.id)
    assert revoked is not None and revoked.revoked
    clock.advance(RELOAD_S)
    assert (await count(client, SHOP, token)).status_code == 401
    assert (await count(client, SHOP, keep)).status_code == 200
    assert store.revoke("nosuchid") is None


@pytest.mark.anyio
async def test_revoking_the_last_token_reopens_auto_mode(
    client: httpx.AsyncClient, store: TokenStore, clock: FakeClock
) -> None:
    _token, record = store.create("read", [SHOP])
    clock.advance(RELOAD_S)
    assert (await count(client, SHOP, None)).status_code == 401
    store.revoke(record.id)
    clock.advance(RELOAD_S)
    assert (await count(client, SHOP, None)).status_code == 200


def test_tokens_are_stored_hashed(store: TokenStore) -> None:
    made = [store.create(scope, sites)[0] for scope, sites in [("read", [SHOP]), ("admin", [])]]
    records = store.records()
    raw = b"".join(p.read_bytes() for p in store.path.parent.glob("tokens.sqlite*"))
    for token, record in zip(made, records, strict=True):
        assert token.startswith("fr_") and len(token) > 40
        assert token.encode() not in raw and token[3:].encode() not in raw
        assert record.digest.encode() in raw
        assert record.id == record.digest[:8]
    assert store.path.stat().st_mode & 0o077 == 0, "the store is private to its owner"


@pytest.mark.anyio
async def test_rate_limit_answers_429_then_recovers(
    client: httpx.AsyncClient, store: TokenStore, clock: FakeClock
) -> None:
    token, _ = store.create("read", [SHOP], rate_per_s=1)
    other, _ = store.create("read", [SHOP], rate_per_s=1)
    answers = [(await count(client, SHOP, token)).status_code for _ in range(3)]
    assert answers == [200, 200, 429], "a burst of 2 s of rate passes, then it waits"
    limited = await count(client, SHOP, token)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    clock.advance(1.0)
    assert (await count(client, SHOP, token)).status_code == 200
    assert (await count(client, SHOP, token)).status_code == 429
    # Buckets are per token.
    assert (await count(client, SHOP, other)).status_code == 200


# --------------------------------------------------------------------------- pure rules


def test_token_bucket_refills_at_its_rate_up_to_two_seconds() -> None:
    bucket = TokenBucket.full(rate_per_s=10, now_s=0.0)
    assert [bucket.take(0.0) for _ in range(20)] == [0.0] * 20
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0
    assert [bucket.take(100.0) for _ in range(20)] == [0.0] * 20  # capped at 2 s of rate
    assert bucket.take(100.0) > 0
    slow = TokenBucket.full(rate_per_s=0.25, now_s=0.0)
    assert slow.take(0.0) == 0.0
    assert slow.take(0.0) == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer", None),
        ("Token abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token_parsing(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("scope", "sites", "rate", "message"),
    [
        ("read", [], None, "must name the sites"),
        ("ingest", [], None, "must name the sites"),
        ("admin", [SHOP], None, "covers every site"),
        ("owner", [SHOP], None, "scope must be one of"),
        ("read", ["http://shop.example/"], None, "site"),
        ("read", [SHOP], 0.0, "rate must be"),
        ("read", [SHOP], -1.0, "rate must be"),
        ("read", [SHOP], float("nan"), "rate must be"),
    ],
)
def test_bad_grants_are_refused(
    scope: str, sites: list[str], rate: float | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_grant(scope, sites, rate)


def test_grants_normalize_sites() -> None:
    assert check_grant("read", ["Shop.Example.", "shop.example"], 2.5) == (
        "read",
        frozenset({SHOP}),
        2.5,
    )


def test_allow_sites_lists_every_forbidden_site() -> None:
    grant = Grant("abcd1234", "ingest", frozenset({SHOP}))
    assert allow_sites(grant, [SHOP]).ok
    assert allow_sites(None, [OTHER]).ok
    assert allow_sites(Grant("env", "admin", frozenset()), [OTHER]).ok
    decision = allow_sites(grant, [SHOP, "b.example", "a.example", "b.example"])
    assert decision.status == 403
    assert decision.forbidden_sites == ("a.example", "b.example")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("FLOWRAY_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("FLOWRAY_AUTH", raising=False)
    return CliRunner()


def test_cli_token_create_list_revoke(runner: CliRunner, tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    made = runner.invoke(
        cli_app,
        [
            "token",
            "create",
            "--scope",
            "read",
            "--site",
            "Shop.Example",
            "--site",
            "b.example",
            "--rate",
            "5",
            "--name",
            "dashboard",
            *data,
        ],
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert token.startswith("fr_") and "\n" not in token, "stdout is the token alone"
    store = TokenStore(tmp_path / "data" / "tokens.sqlite")
    (record,) = store.records()
    assert record.id in made.stderr and "shown once" in made.stderr
    assert "demands tokens" in made.stderr  # the first token locks an auto-mode cluster
    assert record.sites == {SHOP, "b.example"} and record.rate_per_s == 5

    admin = runner.invoke(cli_app, ["token", "create", "--scope", "admin", *data])
    assert admin.exit_code == 0, admin.output
    assert "demands tokens" not in admin.stderr
    secrets = [token, admin.stdout.strip()]

    listed = runner.invoke(cli_app, ["token", "list", *data])
    assert listed.exit_code == 0, listed.output
    assert record.id in listed.output and "dashboard" in listed.output
    as_json = runner.invoke(cli_app, ["token", "list", "--json", *data])
    rows = json.loads(as_json.stdout)
    assert [r["scope"] for r in rows] == ["read", "admin"]
    assert rows[0]["sites"] == ["b.example", SHOP] and rows[0]["revoked"] is False
    for out in (listed.output, as_json.output):
        for secret in secrets:
            assert secret not in out and secret[3:13] not in out
        assert all(r.digest not in out for r in store.records())

    revoked = runner.invoke(cli_app, ["token", "revoke", record.id, *data])
    assert revoked.exit_code == 0, revoked.output
    assert "revoked" in revoked.output
    rows = json.loads(runner.invoke(cli_app, ["token", "list", "--json", *data]).stdout)
    assert [r["revoked"] for r in rows] == [True, False]
    assert "revoked" in runner.invoke(cli_app, ["token", "list", *data]).output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--scope", "read"], "must name the sites"),
        (["create", "--scope", "ingest"], "must name the sites"),
        (["create", "--scope", "admin", "--site", SHOP], "covers every site"),
        (["create", "--scope", "read", "--site", SHOP, "--rate", "0"], "rate must be"),
        (["create", "--scope", "read", "--site", "not a site"], "site"),
        (["revoke", "deadbeef"], "no token with id"),
    ],
)
def test_cli_token_errors_are_clear(
    runner: CliRunner, tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(cli_app, ["token", *args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert TokenStore(tmp_path / "tokens.sqlite").records() == []


def test_cli_token_scope_is_a_choice(runner: CliRunner, tmp_path: Path) -> None:
    """An unknown scope fails at the command line, before the store is opened, with the
    choices listed (typer's usage error: exit code 2)."""
    args = ["token", "create", "--scope", "root", "--site", SHOP, "--data-dir", str(tmp_path)]
    result = runner.invoke(cli_app, args)
    assert result.exit_code == 2
    assert "'root' is not one of" in result.output + result.stderr
    assert "Traceback" not in result.output
    assert TokenStore(tmp_path / "tokens.sqlite").records() == []


def test_cli_token_list_of_an_empty_store(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli_app, ["token", "list", "--json", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert not (tmp_path / "tokens.sqlite").exists()


@pytest.mark.parametrize("command", [[], ["create"], ["list"], ["revoke"]])
def test_cli_token_help(runner: CliRunner, command: list[str]) -> None:
    result = runner.invoke(cli_app, ["token", *command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
