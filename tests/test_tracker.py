"""POST /api/event, Plausible's Events API: the pure payload rules as tables, the
client address and rate limits, then the route through real HTTP on create_app
(httpx.ASGITransport, a real site registry and salt store in tmp_path, ingest recorded
by a fake), and once on a real local cluster through both fronts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from flowray.api.app import IngestFastPath, create_app
from flowray.api.tracker import RateLimiter, client_address, trusted_networks
from flowray.cluster import control as cluster
from flowray.config import Settings
from flowray.ingest import plausible
from flowray.ingest.events import EVENT_SCHEMA
from flowray.ingest.plausible import PayloadError, parse_body
from flowray.query.cache import MemoryCache
from flowray.warehouse.sites import SiteRegistry, SiteStore, sites_file
from tests.fakes import FakeAdmin
from tests.helpers import cluster_settings, running_cluster
from tests.test_app import NOW_S, SHARD_MAP, RecordingIngest

SITE = "shop.example"
CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
PEER = "203.0.113.7"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def body(**fields: Any) -> bytes:
    event = {"n": "pageview", "u": f"https://{SITE}/", "d": SITE, **fields}
    return orjson.dumps({k: v for k, v in event.items() if v is not ...})


# --------------------------------------------------------------------------- the payload

GOOD: list[tuple[bytes, dict[str, Any]]] = [
    (body(), {"sites": (SITE,), "name": "pageview", "path": "/", "referrer": None}),
    (
        orjson.dumps(
            {"name": "Signup", "url": "http://Shop.Example/a/b", "domain": "Shop.Example."}
        ),
        {"sites": (SITE,), "name": "Signup", "path": "/a/b"},
    ),
    (  # only the campaign parameters stay; the fragment goes
        body(u=f"https://{SITE}/p?email=a%40b.c&utm_source=news&token=x&REF=hn&source=s#top"),
        {"path": "/p?utm_source=news&REF=hn&source=s"},
    ),
    (
        body(u=f"https://{SITE}:8443/x?utm_medium=mail&utm_campaign=c&utm_term=t&utm_content=k"),
        {"path": "/x?utm_medium=mail&utm_campaign=c&utm_term=t&utm_content=k"},
    ),
    (body(u=f"https://{SITE}"), {"path": "/"}),
    (body(d=f"{SITE}, Other.Example,{SITE}"), {"sites": (SITE, "other.example")}),
    (
        body(r="https://news.example/post?id=7&sid=secret#c"),
        {"referrer": "https://news.example/post"},
    ),
    (body(r=None), {"referrer": None}),
    (body(r=""), {"referrer": None}),
    (body(n=404), {"name": "404"}),
    (
        body(p={"plan": "pro", "n": 3, "ok": True, "x": 1.5}),
        {"props": '{"plan":"pro","n":"3","ok":"true","x":"1.5"}'},
    ),
    (body(p='{"plan":"pro"}'), {"props": '{"plan":"pro"}'}),
    (body(p={"empty": "", "none": None, " ": "v"}), {"props": None}),
    (body(p={f"k{i}": "v" for i in range(30)}), {}),
    (body(i=False, revenue={"amount": 1}, v=36, h=1), {"name": "pageview"}),
    (body(n="engagement"), {"name": "engagement"}),
]


@pytest.mark.parametrize(("raw", "expected"), GOOD)
def test_a_good_payload(raw: bytes, expected: dict[str, Any]) -> None:
    hit = parse_body(raw)
    for name, value in expected.items():
        assert getattr(hit, name) == value, name
    if hit.props is not None:
        assert len(hit.props) <= plausible.PROPS_CHARS_MAX


def test_engagement_events_are_not_counted() -> None:
    assert not parse_body(body(n="engagement")).counted
    assert parse_body(body()).counted


BAD: list[tuple[bytes, int, str]] = [
    (b'{"n": "pageview",', 400, "malformed JSON"),
    (b'{"n": "\xff\xfe", "u": "x"}', 400, "not valid UTF-8"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (body(n=...), 400, "name: missing"),
    (body(n=""), 400, "name: missing"),
    (body(n=True), 400, "name: must be a string"),
    (body(n="x" * 129), 400, "name: longer than 128"),
    (body(u=...), 400, "url: missing"),
    (body(u=7), 400, "url: must be a string"),
    (body(u="/just/a/path"), 400, "http or https URL with a host"),
    (body(u="ftp://shop.example/"), 400, "http or https URL with a host"),
    (body(u="https:///nohost"), 400, "http or https URL with a host"),
    (body(u="http://[::1/"), 400, "url: not a valid URL"),
    (body(u="https://shop.example/" + "a" * 2048), 400, "url: longer than 2048"),
    (body(d=...), 400, "domain: missing"),
    (body(d=["shop.example"]), 400, "domain: must be a string"),
    (body(d="shop.example,,b.example"), 400, "empty site name"),
    (body(d="shop example"), 400, "domain:"),
    (body(d=",".join(f"s{i}.example" for i in range(11))), 400, "at most 10"),
    (body(r=5), 400, "referrer: must be a string"),
    (body(p=[1]), 400, "props: must be an object"),
    (body(p="not json"), 400, "props: text that is not the JSON"),
    (body(p={"a": {"b": 1}}), 400, "not nested"),
    (body(p={"a": [1]}), 400, "not nested"),
    (body(p={f"k{i}": "v" for i in range(31)}), 400, "31 properties; at most 30"),
    (body(p={"k" * 301: "v"}), 400, "key is longer than 300"),
    (body(p={"k": "v" * 2001}), 400, "longer than 2000"),
    (body(p={f"k{i}": "v" * 100 for i in range(20)}), 400, "longer than 2048 characters as JSON"),
    (b" " * (8 * 1024 + 1), 413, "larger than 8192 bytes"),
]


@pytest.mark.parametrize(("raw", "status", "reason"), BAD)
def test_a_bad_payload_is_refused_naming_the_problem(raw: bytes, status: int, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_body(raw)
    assert caught.value.status == status
    assert reason in str(caught.value)


def test_events_hash_the_address_and_never_carry_it() -> None:
    hit = parse_body(body(d=f"{SITE},other.example"))
    salt = bytes(range(32))
    rows = plausible.events(hit, ts_ms=1, ua=CHROME, ip="198.51.100.9", salt=salt)
    assert [r["site"] for r in rows] == [SITE, "other.example"]
    assert rows[0]["visitor"] != rows[1]["visitor"]  # the site is hashed in
    assert "198.51.100.9" not in orjson.dumps(rows).decode()
    assert set(rows[0]) == set(EVENT_SCHEMA.names)
    assert plausible.events(hit, ts_ms=1, ua=CHROME, ip=None, salt=salt)[0]["visitor"] is None


def test_bots() -> None:
    assert plausible.is_bot(None) and plausible.is_bot("  ")
    assert plausible.is_bot("Googlebot/2.1 (+http://www.google.com/bot.html)")
    assert plausible.is_bot("curl/8.4.0")
    assert not plausible.is_bot(CHROME)


# --------------------------------------------------------------------------- addresses

TRUSTED = trusted_networks("10.0.0.0/8, 192.0.2.1,2001:db8::/32")


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        (PEER, [], PEER),
        (PEER, ["198.51.100.1"], PEER),  # an untrusted peer's header is anyone's text
        ("10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        ("10.1.2.3", ["6.6.6.6, 198.51.100.1, 192.0.2.1"], "198.51.100.1"),
        ("10.1.2.3", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # two headers
        ("10.1.2.3", ["198.51.100.1:5555"], "198.51.100.1"),
        ("10.1.2.3", ["[2001:db9::1]:443"], "2001:db9::1"),
        ("10.1.2.3", ["unknown"], "10.1.2.3"),  # the proxy wrote no address
        ("10.1.2.3", ["198.51.100.1, garbage"], "10.1.2.3"),
        ("10.1.2.3", ["192.0.2.1, 10.9.9.9"], "192.0.2.1"),  # every hop trusted
        ("10.1.2.3", [], "10.1.2.3"),
        ("::ffff:10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        (None, ["198.51.100.1"], None),
    ],
)
def test_client_address(peer: str | None, forwarded: list[str], client: str | None) -> None:
    found = client_address(peer, forwarded, TRUSTED)
    assert (None if found is None else str(found)) == client


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="'proxy.local' is no address or network"):
        trusted_networks("10.0.0.1,proxy.local")
    assert trusted_networks(" , ") == ()


def test_rate_limiter_is_bounded_and_forgets_idle_buckets() -> None:
    limiter = RateLimiter(rate_per_s=1.0, max_keys=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    for key in "bcd":
        limiter.take(key, 0.0)
    assert len(limiter) == 3  # "a", the least recently used, went
    assert limiter.take("a", 0.0) == 0.0  # a new, full bucket
    limiter.take("e", 10.0)  # the others are full again: idle, dropped
    assert len(limiter) <= 2


# --------------------------------------------------------------------------- the route


class GatedIngest(RecordingIngest):
    """Commits only once ``gate`` is set, so a test can see the answer wait for it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def commit(self, groups: Any) -> None:
        await self.gate.wait()
        await super().commit(groups)


def make_app(tmp_path: Path, ingest: RecordingIngest, **overrides: Any) -> FastAPI:
    settings = Settings(
        data_dir=tmp_path,
        shards=SHARD_MAP.shard_count,
        groups=SHARD_MAP.group_count,
        **overrides,
    )
    store = SiteStore(sites_file(settings.warehouse_dir))
    for site in (SITE, "other.example"):
        store.add(site)
    return create_app(
        settings=settings,
        shard_map=SHARD_MAP,
        ingest=ingest,
        warehouse=None,  # type: ignore[arg-type]  # the tracker reads no warehouse
        admin=FakeAdmin(),
        cache=MemoryCache(),
        clock=lambda: NOW_S,
        sites=SiteRegistry(store, reload_s=0.5),
    )


def client(app: FastAPI, peer: str = PEER, front: str = "fastapi") -> httpx.AsyncClient:
    asgi = IngestFastPath(app) if front == "gateway" else app
    transport = httpx.ASGITransport(app=asgi, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.fixture
def ingest() -> GatedIngest:
    return GatedIngest()


@pytest.fixture
async def tracker(
    tmp_path: Path, ingest: GatedIngest, front: str
) -> AsyncIterator[httpx.AsyncClient]:
    async with client(make_app(tmp_path, ingest), front=front) as c:
        yield c


async def post(
    c: httpx.AsyncClient, raw: bytes, ua: str | None = CHROME, **headers: str
) -> httpx.Response:
    request = c.build_request(
        "POST", "/api/event", content=raw, headers={"Content-Type": "text/plain", **headers}
    )
    if ua is None:
        del request.headers["user-agent"]
    else:
        request.headers["user-agent"] = ua
    return await c.send(request)


@pytest.mark.anyio
async def test_a_page_view_is_committed_then_answered_202_ok(
    tracker: httpx.AsyncClient, ingest: GatedIngest
) -> None:
    raw = body(u=f"https://{SITE}/p?email=me%40x.org&utm_source=news#f", r="https://a.example/?q=1")
    answer = await post(tracker, raw, Origin="https://shop.example")
    assert (answer.status_code, answer.text) == (202, "ok"), answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.headers["access-control-allow-origin"] == "*"
    [event] = ingest.events()
    assert event["site"] == SITE
    assert event["ts"] == int(NOW_S * 1000)
    assert event["path"] == "/p?utm_source=news"
    assert event["referrer"] == "https://a.example/"
    assert event["ua"] == CHROME
    assert len(event["visitor"]) == 16 and event["id"] is None
    if "name" in EVENT_SCHEMA.names:  # the schema's new fields
        assert event["name"] == "pageview" and event["props"] is None
    stored = orjson.dumps(ingest.events()) + b"".join(p.payload for _, p in ingest.pieces())
    assert PEER.encode() not in stored  # the address is in no stored event


@pytest.mark.anyio
async def test_props_and_several_domains(tracker: httpx.AsyncClient, ingest: GatedIngest) -> None:
    raw = body(n="Signup", d=f"{SITE},other.example", p='{"plan":"pro"}')
    assert (await post(tracker, raw)).status_code == 202
    events = sorted(ingest.events(), key=lambda e: e["site"])
    assert [e["site"] for e in events] == ["other.example", SITE]
    if "name" in EVENT_SCHEMA.names:
        assert {(e["name"], e["props"]) for e in events} == {("Signup", '{"plan":"pro"}')}


@pytest.mark.anyio
@pytest.mark.parametrize(("raw", "status", "reason"), [BAD[0], BAD[1], BAD[3], BAD[9], BAD[22]])
async def test_a_bad_request_stores_nothing(
    tracker: httpx.AsyncClient, ingest: GatedIngest, raw: bytes, status: int, reason: str
) -> None:
    answer = await post(tracker, raw)
    assert answer.status_code == status and reason in answer.json()["error"]
    assert answer.headers["access-control-allow-origin"] == "*"
    assert ingest.events() == []


@pytest.mark.anyio
async def test_a_body_over_8_kib_is_413(tracker: httpx.AsyncClient, ingest: GatedIngest) -> None:
    answer = await post(tracker, body(p="x" * 9000))
    assert answer.status_code == 413 and "8192" in answer.json()["error"]
    assert ingest.events() == []


@pytest.mark.anyio
async def test_an_unregistered_site_is_400_naming_it(
    tracker: httpx.AsyncClient, ingest: GatedIngest
) -> None:
    answer = await post(tracker, body(d=f"{SITE},stranger.example"))
    assert answer.status_code == 400
    assert "site stranger.example is not registered" in answer.json()["error"]
    assert ingest.events() == []  # all or nothing: the registered site's event neither


@pytest.mark.anyio
@pytest.mark.parametrize(
    "ua", [None, "Googlebot/2.1 (+http://www.google.com/bot.html)", "python-requests/2.32"]
)
async def test_bots_are_answered_202_and_dropped(
    tracker: httpx.AsyncClient, ingest: GatedIngest, ua: str | None
) -> None:
    answer = await post(tracker, body(), ua=ua)
    assert (answer.status_code, answer.text) == (202, "ok")
    assert answer.headers["x-plausible-dropped"] == "1"
    assert ingest.events() == []


@pytest.mark.anyio
async def test_engagement_events_are_answered_and_dropped(
    tracker: httpx.AsyncClient, ingest: GatedIngest
) -> None:
    answer = await post(tracker, body(n="engagement", sd=50, e=1200))
    assert answer.status_code == 202 and answer.headers["x-plausible-dropped"] == "1"
    assert ingest.events() == []


@pytest.mark.anyio
async def test_cors_preflight(tracker: httpx.AsyncClient) -> None:
    answer = await tracker.options(
        "/api/event",
        headers={
            "Origin": "https://anywhere.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert answer.headers["access-control-allow-headers"].lower() == "content-type"


@pytest.mark.anyio
async def test_the_answer_waits_for_the_commit(
    tracker: httpx.AsyncClient, ingest: GatedIngest
) -> None:
    ingest.gate.clear()
    sent = asyncio.ensure_future(post(tracker, body()))
    await asyncio.sleep(0.2)
    assert not sent.done(), "answered before the events were committed"
    ingest.gate.set()
    answer = await asyncio.wait_for(sent, 5)
    assert answer.status_code == 202 and len(ingest.events()) == 1


@pytest.mark.anyio
async def test_no_quorum_is_503_with_retry_after(tmp_path: Path) -> None:
    from flowray.api.common import Unavailable

    ingest = RecordingIngest()
    ingest.error = Unavailable("group 0 has no master", retry_after_s=2)
    async with client(make_app(tmp_path, ingest)) as c:
        answer = await post(c, body())
    assert answer.status_code == 503 and answer.headers["retry-after"] == "2"
    assert answer.headers["access-control-allow-origin"] == "*"


async def visitor_of(app: FastAPI, ingest: RecordingIngest, peer: str, forwarded: str) -> str:
    async with client(app, peer) as c:
        answer = await post(c, body(), **{"X-Forwarded-For": forwarded})
    assert answer.status_code == 202, answer.text
    return str(ingest.events()[-1]["visitor"])


@pytest.mark.anyio
async def test_forwarded_for_counts_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    ingest = RecordingIngest()
    app = make_app(tmp_path, ingest, trusted_proxies="10.0.0.0/8")
    via_proxy = [
        await visitor_of(app, ingest, "10.0.0.5", ip) for ip in ("198.51.100.1", "198.51.100.2")
    ]
    assert via_proxy[0] != via_proxy[1]  # two clients behind the proxy: two visitors
    spoofed = [await visitor_of(app, ingest, PEER, ip) for ip in ("198.51.100.1", "198.51.100.2")]
    assert spoofed[0] == spoofed[1]  # one client lying in the header: one visitor
    assert spoofed[0] not in via_proxy
    assert await visitor_of(app, ingest, PEER, "") == spoofed[0]


@pytest.mark.anyio
async def test_rate_limit_per_address(tmp_path: Path) -> None:
    ingest = RecordingIngest()
    app = make_app(tmp_path, ingest, event_rate_per_ip=1.0)  # a burst of 2
    async with client(app, PEER) as c:
        answers = [await post(c, body()) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 429]
    assert int(answers[2].headers["retry-after"]) >= 1
    assert "address" in answers[2].json()["error"]
    async with client(app, "198.51.100.77") as other:
        assert (await post(other, body())).status_code == 202
    assert len(ingest.events()) == 3


@pytest.mark.anyio
async def test_rate_limit_per_site(tmp_path: Path) -> None:
    ingest = RecordingIngest()
    app = make_app(tmp_path, ingest, event_rate_per_site=1.0)
    codes = []
    for i in range(3):
        async with client(app, f"198.51.100.{i + 1}") as c:
            codes.append(await post(c, body()))
    assert [a.status_code for a in codes] == [202, 202, 429]
    assert f"site {SITE}" in codes[2].json()["error"]
    async with client(app, "198.51.100.50") as c:
        assert (await post(c, body(d="other.example"))).status_code == 202


@pytest.mark.anyio
async def test_the_route_is_in_the_openapi_document(tmp_path: Path) -> None:
    async with client(make_app(tmp_path, RecordingIngest())) as c:
        document = (await c.get("/openapi.json")).json()
    operation = document["paths"]["/api/event"]["post"]
    assert {"202", "400", "413", "429", "503"} <= set(operation["responses"])
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"name", "url", "domain", "referrer", "props"} <= set(schema["properties"])
    assert "text/plain" in operation["responses"]["202"]["content"]


# --------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def running(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("tracker"), serve_port, redis_url, "flowray-tracker"
    )
    with running_cluster(settings) as (the_cluster, url):
        yield the_cluster, url


def test_events_through_both_fronts_of_a_real_cluster(
    running: tuple[cluster.Cluster, str],
) -> None:
    """Registered through the admin route on Serve, the site is taken by the gateway
    (another process) within sites_reload_s; each front's 202 is a committed event,
    counted at once (live) by the traffic query."""
    the_cluster, url = running
    gateway = f"http://127.0.0.1:{the_cluster.settings.ingest_port}"
    site = "tracked.example"
    headers = {"Content-Type": "text/plain", "User-Agent": CHROME}
    raw = orjson.dumps({"n": "pageview", "u": f"https://{site}/a?secret=1", "d": site})
    with (
        httpx.Client(base_url=url, timeout=30) as serve,
        httpx.Client(base_url=gateway, timeout=30) as gw,
    ):
        refused = gw.post("/api/event", content=raw, headers=headers)
        assert refused.status_code == 400 and site in refused.text
        added = serve.post("/v1/sites", json={"domain": site, "timezone": "Europe/Berlin"})
        assert added.status_code == 201, added.text
        assert (serve.post("/api/event", content=raw, headers=headers).status_code, "ok") == (
            202,
            "ok",
        )
        deadline = time.monotonic() + 10 * the_cluster.settings.sites_reload_s
        while (answer := gw.post("/api/event", content=raw, headers=headers)).status_code != 202:
            assert answer.status_code == 400 and time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.text == "ok" and answer.headers["access-control-allow-origin"] == "*"
        assert [s["domain"] for s in serve.get("/v1/sites").json()] == [site]
        now_ms = int(time.time() * 1000)
        params = {"start": str(now_ms - 3_600_000), "end": str(now_ms + 3_600_000)}
        series = serve.get(f"/v1/sites/{site}/traffic", params=params).json()
    assert series["total"] == 2, series
