"""The registry of sites: the SQLite store (real files), a front's snapshot of it, the
admin routes through real HTTP on create_app, and ``flowray sites``."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from flowray.api.app import create_app
from flowray.api.auth import Authorizer, TokenStore
from flowray.cli import app as cli_app
from flowray.config import Settings
from flowray.query.cache import MemoryCache
from flowray.warehouse import sites as sites_module
from flowray.warehouse.sites import (
    Site,
    SiteExists,
    SiteRegistry,
    SiteStore,
    SitesUnavailable,
    check_site,
    sites_file,
)
from tests.fakes import FakeAdmin, client_for
from tests.test_app import NOW_S, SHARD_MAP, RecordingIngest

ADMIN_TOKEN = "fr_test_admin_token"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> SiteStore:
    return SiteStore(sites_file(tmp_path / "warehouse"))


# --------------------------------------------------------------------------- the store


def test_add_list_remove(store: SiteStore) -> None:
    assert store.sites() == [] and not store.path.exists()  # reading creates nothing
    site, new = store.add("Shop.Example.", "Europe/Berlin", now_ms=5)
    assert new and site == Site("shop.example", "Europe/Berlin", 5)
    store.add("bücher.example")
    assert [(s.domain, s.timezone) for s in store.sites()] == [
        ("shop.example", "Europe/Berlin"),
        ("xn--bcher-kva.example", "UTC"),
    ]
    assert store.remove("SHOP.example") == site
    assert store.remove("shop.example") is None
    assert [s.domain for s in store.sites()] == ["xn--bcher-kva.example"]


def test_adding_again_is_no_change_unless_the_zone_differs(store: SiteStore) -> None:
    first, _ = store.add("shop.example", "Asia/Kolkata", now_ms=1)
    again, new = store.add("shop.example.", "Asia/Kolkata", now_ms=2)
    assert not new and again == first
    with pytest.raises(SiteExists, match="registered already, in time zone Asia/Kolkata"):
        store.add("shop.example", "UTC")


@pytest.mark.parametrize(
    ("domain", "tz", "reason"),
    [
        ("https://shop.example/", "UTC", "domain:"),
        ("", "UTC", "domain: site is empty"),
        ("shop.example", "Mars/Olympus", "timezone: unknown time zone"),
        ("shop.example", "../../etc/passwd", "timezone: unknown time zone"),
        ("shop.example", "", "timezone:"),
    ],
)
def test_bad_sites_are_refused(store: SiteStore, domain: str, tz: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        store.add(domain, tz)
    assert store.sites() == []


def test_the_store_is_wal_and_bounded(store: SiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("a.example")
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    monkeypatch.setattr(sites_module, "SITES_MAX", 2)
    store.add("b.example")
    with pytest.raises(ValueError, match="holds 2 sites"):
        store.add("c.example")


def test_a_locked_store_is_unavailable_within_its_timeout(tmp_path: Path) -> None:
    store = SiteStore(sites_file(tmp_path), timeout_s=0.1)
    store.add("a.example")
    holder = sqlite3.connect(store.path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(SitesUnavailable, match="locked"):
            store.add("b.example")
    finally:
        holder.rollback()
        holder.close()


def test_check_site() -> None:
    assert check_site("WWW.Shop.Example.", "America/New_York") == (
        "www.shop.example",
        "America/New_York",
    )


# --------------------------------------------------------------------------- the snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_the_snapshot_is_reread_after_reload_s(store: SiteStore) -> None:
    clock = Clock()
    registry = SiteRegistry(store, reload_s=2.0, clock=clock)
    store.add("a.example")
    assert set((await registry.snapshot()).by_domain) == {"a.example"}
    store.add("b.example")  # another front wrote it
    clock.now = 1.0
    assert set((await registry.snapshot()).by_domain) == {"a.example"}
    clock.now = 2.5
    await registry.snapshot()  # starts the read; answers from the snapshot meanwhile
    await asyncio.sleep(0.2)
    assert set((await registry.snapshot()).by_domain) == {"a.example", "b.example"}
    assert registry.timezone_of("b.example") == "UTC"
    assert registry.timezone_of("c.example") is None


@pytest.mark.anyio
async def test_an_unreadable_store_keeps_the_last_snapshot(store: SiteStore) -> None:
    clock = Clock()
    registry = SiteRegistry(store, reload_s=1.0, clock=clock)
    store.add("a.example")
    assert (await registry.snapshot()).unknown(["a.example", "z.example"]) == ["z.example"]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store.path}{suffix}").unlink(missing_ok=True)
    store.path.write_bytes(b"this is not a database" * 100)
    clock.now = 5.0
    await registry.snapshot()
    await asyncio.sleep(0.2)
    assert set((await registry.snapshot()).by_domain) == {"a.example"}


@pytest.mark.anyio
async def test_never_read_is_unavailable(tmp_path: Path) -> None:
    path = sites_file(tmp_path)
    path.write_bytes(b"garbage" * 100)
    registry = SiteRegistry(SiteStore(path), reload_s=1.0, read_timeout_s=1.0)
    with pytest.raises(SitesUnavailable, match="could not be read"):
        await registry.snapshot()


@pytest.mark.anyio
async def test_a_slow_store_does_not_hold_the_loop(store: SiteStore) -> None:
    """A read that stalls is given up after read_timeout_s; the loop runs meanwhile."""

    class Slow(SiteStore):
        def sites(self) -> list[Site]:
            import time

            time.sleep(1.0)
            return []

    registry = SiteRegistry(Slow(store.path), reload_s=1.0, read_timeout_s=0.2)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.ensure_future(tick())
    with pytest.raises(SitesUnavailable):
        await registry.snapshot()
    ticker.cancel()
    assert ticks >= 10


# --------------------------------------------------------------------------- the routes


def make_app(tmp_path: Path, authorizer: Authorizer | None = None) -> FastAPI:
    layout: dict[str, Any] = {"shards": SHARD_MAP.shard_count, "groups": SHARD_MAP.group_count}
    settings = Settings(data_dir=tmp_path, **layout)
    return create_app(
        settings=settings,
        shard_map=SHARD_MAP,
        ingest=RecordingIngest(),
        warehouse=None,  # type: ignore[arg-type]  # no queries here
        admin=FakeAdmin(),
        cache=MemoryCache(),
        clock=lambda: NOW_S,
        authorizer=authorizer,
    )


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    authorizer = Authorizer(TokenStore(tmp_path / "tokens.sqlite"), admin_token=ADMIN_TOKEN)
    async with client_for(make_app(tmp_path, authorizer)) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield c


@pytest.mark.anyio
async def test_routes_register_list_and_remove(api: httpx.AsyncClient, tmp_path: Path) -> None:
    added = await api.post("/v1/sites", json={"domain": "Shop.Example", "timezone": "Asia/Tokyo"})
    assert added.status_code == 201, added.text
    assert added.json()["domain"] == "shop.example" and added.json()["timezone"] == "Asia/Tokyo"
    again = await api.post("/v1/sites", json={"domain": "shop.example", "timezone": "Asia/Tokyo"})
    assert again.status_code == 200 and again.json() == added.json()
    other = await api.post("/v1/sites", json={"domain": "shop.example"})
    assert other.status_code == 409 and "Asia/Tokyo" in other.json()["error"]
    listed = await api.get("/v1/sites")
    assert listed.status_code == 200 and listed.json() == [added.json()]
    on_disk = SiteStore(sites_file(tmp_path / "warehouse")).sites()  # the settings' warehouse
    assert [s.domain for s in on_disk] == ["shop.example"]
    removed = await api.delete("/v1/sites/SHOP.example.")
    assert removed.status_code == 200 and removed.json()["domain"] == "shop.example"
    assert (await api.delete("/v1/sites/shop.example")).status_code == 404
    assert (await api.get("/v1/sites")).json() == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "payload",
    [
        {"domain": "not a site", "timezone": "UTC"},
        {"domain": "shop.example", "timezone": "Nowhere/City"},
        {"domain": "shop.example", "extra": 1},
        {"timezone": "UTC"},
    ],
)
async def test_bad_registrations_are_422(api: httpx.AsyncClient, payload: dict[str, Any]) -> None:
    answer = await api.post("/v1/sites", json=payload)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]
    assert (await api.get("/v1/sites")).json() == []


@pytest.mark.anyio
async def test_routes_need_the_admin_token(api: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/v1/sites"), ("POST", "/v1/sites"), ("DELETE", "/v1/sites/a.b")):
        answer = await api.request(
            method, path, json={"domain": "a.b"}, headers={"Authorization": ""}
        )
        assert answer.status_code == 401, (method, path)


@pytest.mark.anyio
async def test_a_site_registered_by_route_is_taken_at_once(api: httpx.AsyncClient) -> None:
    event = {"n": "pageview", "u": "https://new.example/", "d": "new.example"}
    ua = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/127.0"}
    assert (
        await api.post("/api/event", content=orjson.dumps(event), headers=ua)
    ).status_code == 400
    assert (await api.post("/v1/sites", json={"domain": "new.example"})).status_code == 201
    answer = await api.post("/api/event", content=orjson.dumps(event), headers=ua)
    assert answer.status_code == 202, answer.text
    assert (await api.delete("/v1/sites/new.example")).status_code == 200
    assert (
        await api.post("/api/event", content=orjson.dumps(event), headers=ua)
    ).status_code == 400


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("FLOWRAY_DATA_DIR", "FLOWRAY_WAREHOUSE"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def test_cli_add_list_remove(runner: CliRunner, tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    added = runner.invoke(
        cli_app, ["sites", "add", "Shop.Example.", "--timezone", "Europe/Paris", *data]
    )
    assert added.exit_code == 0, added.output
    assert "site shop.example (Europe/Paris) registered" in added.output
    again = runner.invoke(
        cli_app, ["sites", "add", "shop.example", "--timezone", "Europe/Paris", *data]
    )
    assert again.exit_code == 0 and "was registered already" in again.output
    listed = runner.invoke(cli_app, ["sites", "list", "--json", *data])
    assert listed.exit_code == 0
    [site] = orjson.loads(listed.stdout)
    assert (site["domain"], site["timezone"]) == ("shop.example", "Europe/Paris")
    table = runner.invoke(cli_app, ["sites", "list", *data])
    assert "shop.example" in table.output and "Europe/Paris" in table.output
    assert [s.domain for s in SiteStore(sites_file(tmp_path / "warehouse")).sites()] == [
        "shop.example"
    ]
    removed = runner.invoke(cli_app, ["sites", "remove", "shop.example", *data])
    assert removed.exit_code == 0 and "unregistered" in removed.output
    missing = runner.invoke(cli_app, ["sites", "remove", "shop.example", *data])
    assert missing.exit_code == 1 and "not registered" in missing.output


def test_cli_refuses_bad_input(runner: CliRunner, tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    bad_zone = runner.invoke(
        cli_app, ["sites", "add", "a.example", "--timezone", "Moon/Base", *data]
    )
    assert bad_zone.exit_code == 1 and "unknown time zone" in bad_zone.output
    bad_site = runner.invoke(cli_app, ["sites", "add", "http://a.example/", *data])
    assert bad_site.exit_code == 1 and "domain:" in bad_site.output
    assert not sites_file(tmp_path / "warehouse").exists()


def test_cli_follows_the_warehouse_setting(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWRAY_WAREHOUSE", str(tmp_path / "shared"))
    answer = runner.invoke(cli_app, ["sites", "add", "a.example", "--data-dir", str(tmp_path)])
    assert answer.exit_code == 0, answer.output
    assert [s.domain for s in SiteStore(sites_file(tmp_path / "shared")).sites()] == ["a.example"]
