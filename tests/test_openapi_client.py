"""A client generated from the app's own OpenAPI document calls the API.

The document is what a client generator gets, so this test is one: it writes what the
app serves at ``/openapi.json`` to a temporary directory, generates a Python client
from it with openapi-python-client (which needs no network), imports it and drives the
app in-process through it, as Serve runs it and as the ingest gateway does. A document
a generator reads wrongly (a body it cannot send, an answer it cannot parse, a choice
it types as a bare string) fails here, where tests/test_schema.py would not notice.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi import FastAPI

from flowray.warehouse.files import Warehouse
from tests.fakes import FakeAdmin, client_for
from tests.test_app import NOW_MS, SHARD_MAP, SITE, SITE_EVENTS, RecordingIngest, make_app, publish

GENERATOR = Path(sys.executable).parent / "openapi-python-client"
PACKAGE = "flowray_client"
# What openapi-python-client cannot do with the document, each operation with the
# generator's reason: it sends no NDJSON (so /v1/events takes JSON only) and no
# text/plain (so it leaves /v1/logs out). Anything else it warns of is a flaw of the
# document. Its messages are matched as it prints them.
GENERATOR_WARNINGS = [
    ("POST /v1/events", "Unsupported content type application/x-ndjson"),
    ("POST /v1/logs", "Unsupported content type text/plain"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The client package generated from the document, imported."""
    root = tmp_path_factory.mktemp("client")
    spec, config = root / "openapi.json", root / "config.json"
    spec.write_bytes(asyncio.run(served_document()))
    config.write_text(json.dumps({"post_hooks": []}))  # no formatting: it only gets imported
    done = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--path",
            str(spec),
            "--output-path",
            str(root / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    warnings = re.findall(r"WARNING parsing (\S+ \S+) within [^\n]*\n\s*([^\n]+)", output)
    assert sorted(warnings) == GENERATOR_WARNINGS, output
    assert "Unable to parse" not in output, output
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


async def served_document() -> bytes:
    """The app's /openapi.json, as a generator would fetch it."""
    async with client_for(make_app()) as c:
        answer = await c.get("/openapi.json")
    assert answer.status_code == 200, answer.text
    return answer.content


def operation(name: str) -> Any:
    """A generated operation's module, e.g. ``queries.traffic``."""
    return importlib.import_module(f"{PACKAGE}.api.{name}")


def models() -> Any:
    return importlib.import_module(f"{PACKAGE}.models")


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warehouse]:
    wh = Warehouse(tmp_path_factory.mktemp("client-wh") / "warehouse", SHARD_MAP.shard_count)
    publish(wh, SITE_EVENTS, "job1")
    yield wh
    wh.catalog.close()


def client(generated: ModuleType, app: FastAPI, front: str = "fastapi") -> Any:
    """The generated client over the app in-process (``front``: see client_for)."""
    api = generated.Client(base_url="http://t", raise_on_unexpected_status=True)
    return api.set_async_httpx_client(client_for(app, front))


@pytest.mark.anyio
@pytest.mark.parametrize("front", ["fastapi", "gateway"])
async def test_events_are_posted_as_a_json_array(generated: ModuleType, front: str) -> None:
    m, ingest = models(), RecordingIngest()
    post_events = operation("ingest.post_events")
    batch = [
        m.Event(site="shop.example", ts=NOW_MS - 1000, path="/a", id=7),
        m.Event(site="News.Example.", ts="2023-11-14T10:00:00Z", referrer=None),
        m.Event(site="blog.example"),  # no ts: the time of receipt
    ]
    async with client(generated, make_app(ingest=ingest), front) as api:
        answer = await post_events.asyncio_detailed(client=api, body=batch)
        assert answer.status_code == 200, answer.content
        assert answer.parsed == m.Accepted(accepted=3)
        one = await post_events.asyncio(client=api, body=m.Event(site="one.example"))
        assert one == m.Accepted(accepted=1)
        refused = await post_events.asyncio_detailed(
            client=api, body=[m.Event(site="a.example"), m.Event(site="not a site!")]
        )
    assert refused.status_code == 422
    assert refused.parsed.total_errors == 1
    assert [(e.position, e.reason[:5]) for e in refused.parsed.errors] == [(1, "site:")]
    stored = {(e["site"], e["ts"], e["id"]) for e in ingest.events()}
    assert stored == {
        ("shop.example", NOW_MS - 1000, "7"),
        ("news.example", 1_699_956_000_000, None),
        ("blog.example", NOW_MS, None),
        ("one.example", NOW_MS, None),
    }


@pytest.mark.anyio
async def test_a_series_is_read_with_an_enum_interval(
    generated: ModuleType, warehouse: Warehouse
) -> None:
    m, traffic = models(), operation("queries.traffic")
    async with client(generated, make_app(warehouse=warehouse)) as api:
        series = await traffic.asyncio(
            SITE, client=api, start="2023-11-14", end="2023-11-15", interval=m.Interval.HOUR
        )
        bad = await traffic.asyncio_detailed(
            SITE, client=api, start="2023-11-14", end="2023-11-15", tz="Mars/Base"
        )
    assert isinstance(series, m.Series)
    assert (series.site, series.interval, series.tz) == (SITE, m.Interval.HOUR, "UTC")
    assert len(series.points) == 24 and series.total == 10
    assert series.points[0].t == "2023-11-14T00:00:00+00:00"
    counts = {p.t[11:13]: p.count for p in series.points if p.count}
    assert counts == {"10": 4, "11": 4, "13": 2}
    assert all(p.provisional for p in series.points)  # the test warehouse has no watermark
    assert bad.status_code == 422
    assert isinstance(bad.parsed, m.Invalid)
    assert "unknown time zone 'Mars/Base'" in bad.parsed.error


@pytest.mark.anyio
async def test_admin_routes(generated: ModuleType) -> None:
    m, admin = models(), FakeAdmin()
    async with client(generated, make_app(admin=admin)) as api:
        processed = await operation("admin.process").asyncio_detailed(
            client=api, mode=m.ProcessMode.ALL
        )
        started = await operation("admin.reprocess").asyncio_detailed(
            client=api,
            body=m.ReprocessRequest(
                start="2020-03-14", end="2020-03-15", sites=["Shop.Example."], dry_run=True
            ),
        )
        job = await operation("admin.job").asyncio(started.parsed.job, client=api)
        missing = await operation("admin.job").asyncio_detailed("nope", client=api)
        versions = await operation("admin.versions").asyncio(client=api)
        moved = await operation("admin.move_shard").asyncio(3, client=api, to=0)
    assert processed.status_code == 200 and admin.modes == ["all"]
    assert started.status_code == 202
    assert (started.parsed.kind, started.parsed.state) == ("reprocess", "done")
    assert admin.requests[0]["sites"] == ["shop.example"]
    assert job.job == started.parsed.job and job.state == "done"
    assert missing.status_code == 404 and "no job nope" in missing.parsed.error
    assert [(v.version, v.logic, v.current) for v in versions] == [(1, "default", True)]
    assert (moved.shard, moved.from_group, moved.to_group) == (3, 1, 0)
