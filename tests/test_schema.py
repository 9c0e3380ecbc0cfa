"""Schemathesis over the app's own OpenAPI: no operation answers 5xx, whatever it is sent.

The app is built in-process by ``create_app`` with fakes for ingest and admin, an
in-memory cache and a real small Parquet warehouse, and each case is sent through its
ASGI interface, so nothing listens on a port. Each operation is its own test item, so a
bug found in one route is marked there while the others keep guarding theirs.

Besides "no 5xx", every response must use a status code the document declares, and a
JSON answer must match the schema the document gives for it (the series, the accepted
count, every error's shape). The content type is not checked case by case: its one
known gap (CSV) is pinned by its own test. Hypothesis runs derandomized and without
its example database, so a run is repeatable and writes nothing into the working tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.core.result import Err, Ok
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from flowray.api.app import create_app
from flowray.api.insights import WarehouseInsights
from flowray.config import Settings
from flowray.core.router import ShardMap
from flowray.ingest.events import EVENT_SCHEMA, TS_MIN_MS
from flowray.ingest.pieces import GroupEvents, Piece, split_batch
from flowray.query import series
from flowray.query.cache import MemoryCache
from flowray.tasks.mapreduce import map_block_slices, reduce_partials, write_units
from flowray.warehouse.files import Warehouse
from tests.fakes import FakeAdmin, as_pieces

NOW_S = 1_700_000_000.0  # 2023-11-14T22:13:20Z, the injected server clock
NOW_MS = int(NOW_S * 1000)
SHARD_MAP = ShardMap.round_robin(4, 2)
REDUCE_KEYS = 2
SITE = "shop.example"
# Per operation and generation mode; with the coverage phase's cases the file runs in
# about ten seconds. Raise it for a longer hunt: FLOWRAY_SCHEMA_EXAMPLES=2000.
EXAMPLES_MAX = int(os.environ.get("FLOWRAY_SCHEMA_EXAMPLES", "50"))


# --------------------------------------------------------------------------- fakes


class RecordingIngest:
    """Accepts every batch and keeps it, as a group with a quorum would."""

    def __init__(self) -> None:
        self.commits: list[dict[int, list[Piece]]] = []

    async def commit(self, groups: dict[int, GroupEvents]) -> None:
        pieces = as_pieces(groups, SHARD_MAP.shard_count)
        self.commits.append(pieces)


def publish(warehouse: Warehouse, times: list[datetime]) -> None:
    """Process SITE's events at ``times`` into units and publish them, as processing does."""
    ts_ms = [int(t.timestamp() * 1000) for t in times]
    table = pa.Table.from_pylist([{"ts": t, "site": SITE} for t in ts_ms], schema=EVENT_SCHEMA)
    pieces = [p for ps in split_batch(table, SHARD_MAP).values() for p in ps]
    blocks = [(p.shard, p.hour) for p in pieces]
    partials = map_block_slices(blocks, [[p.payload] for p in pieces], "default", REDUCE_KEYS)
    reduced = [reduce_partials([partials[k]]) for k in range(REDUCE_KEYS)]
    units = write_units(warehouse.root, "default", "job1", reduced, [(s, h, 1) for s, h in blocks])
    warehouse.catalog.publish(units, {})


def make_app(warehouse: Any) -> FastAPI:
    return create_app(
        # A data directory of its own: the site registry lives there.
        settings=Settings(
            shards=SHARD_MAP.shard_count,
            groups=SHARD_MAP.group_count,
            data_dir=Path(tempfile.mkdtemp(prefix="flowray-schema-")),
        ),
        shard_map=SHARD_MAP,
        ingest=RecordingIngest(),
        warehouse=warehouse,
        admin=FakeAdmin(),
        cache=MemoryCache(),
        clock=lambda: NOW_S,
        # The engine over the same warehouse (none for the document alone).
        insights=None if warehouse is None else WarehouseInsights(warehouse, None, 10.0),
    )


# --------------------------------------------------------------------------- the document

# The app's document describes every body and every fixed choice (test_the_document_*
# pin that), but it cannot know which sites, times and zones make a request that goes
# through: from it alone a generator sends almost only 422 material. These schemas
# narrow those values to the forms the API's contract names, on days around the
# injected clock; schemathesis's negative mode then breaks them (wrong types, patterns,
# missing fields). Everything else (the event's other fields and their limits, the
# choices, the admin routes' bodies and numbers) is generated from the app's document.


def query_times(days: str, epoch_ms: str) -> dict[str, Any]:
    """A date, a date and time (with or without Z) or epoch ms, on the given days."""
    return {
        "anyOf": [
            {"type": "string", "pattern": f"^2023-11-{days}T[01][0-9]:[0-5][0-9](:[0-5][0-9])?Z?$"},
            {"type": "string", "pattern": f"^2023-11-{days}$"},
            {"type": "string", "pattern": f"^{epoch_ms}$"},
        ]
    }


QUERY_PARAMS: dict[str, dict[str, Any]] = {
    "site": {"enum": [SITE, "other.example", "SHOP.Example.", "bücher.example"]},
    # Starts fall on 2023-11-03..13 and ends on 11-14..17, so the range is valid.
    "start": query_times("1[0-3]", "1699[0-4][0-9]{8}"),
    "end": query_times("1[4-6]", "1700[01][0-9]{8}"),
    "tz": {"enum": ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kathmandu"]},
}
EVENT_FIELDS: dict[str, dict[str, Any]] = {
    "ts": {
        "anyOf": [
            {"type": "integer", "minimum": TS_MIN_MS, "maximum": NOW_MS},
            {"type": "string", "pattern": r"^20[0-2][0-9]-[01][0-9]-[0-3][0-9]T12:00:00Z$"},
            {"type": "null"},
        ]
    },
    "site": {"enum": [SITE, "other.example", "Bücher.example"]},
}
EVENT_REF = {"$ref": "#/components/schemas/Event"}
SEED_LINE = (
    r"20(0[0-9]|1[0-9]|2[0-3])\.(0[1-9]|1[0-2])\.(0[1-9]|1[0-9]|2[0-8]) "
    r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{3} [a-z]{1,8}\.example"
)
# The bodies the document can only call strings: NDJSON is generated as a list of
# events (ndjson_lines writes one per line), seed lines by their pattern.
STRING_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/events", "application/x-ndjson"): {"type": "array", "items": EVENT_REF},
    ("/v1/logs", "text/plain"): {"type": "string", "pattern": f"^({SEED_LINE}\\n){{0,5}}$"},
}


def documented(openapi: dict[str, Any]) -> dict[str, Any]:
    """The app's OpenAPI with the values a request must hold to go through narrowed."""
    for item in openapi["paths"].values():
        for operation in item.values():
            for param in operation.get("parameters", []):
                if param["name"] in QUERY_PARAMS:
                    param["schema"] = {**QUERY_PARAMS[param["name"]], "title": param["name"]}
    openapi["components"]["schemas"]["Event"]["properties"].update(EVENT_FIELDS)
    for (path, media_type), body in STRING_BODIES.items():
        content = openapi["paths"][path]["post"]["requestBody"]["content"]
        assert content[media_type]["schema"]["type"] == "string", (path, media_type)
        content[media_type]["schema"] = body
    return openapi


def ndjson_lines(value: Any) -> bytes:
    """One JSON value per line; a negative case that is not a list is sent as one line."""
    lines = value if isinstance(value, list) else [value]
    return "".join(json.dumps(v) + "\n" for v in lines).encode()


schemathesis.serializer("application/x-ndjson")(lambda _ctx, value: ndjson_lines(value))


# The document does not depend on the app's dependencies, so it is read once at
# collection from an app without a warehouse; each case goes to the fixture's app.
schema = schemathesis.openapi.from_dict(documented(make_app(warehouse=None).openapi()))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    warehouse = Warehouse(tmp_path_factory.mktemp("schema") / "warehouse", SHARD_MAP.shard_count)
    day = datetime(2023, 11, 14, tzinfo=UTC)
    publish(warehouse, [day.replace(hour=h, minute=h) for h in range(0, 24, 3)])
    yield make_app(warehouse)
    warehouse.catalog.close()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_MAX,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation(case: schemathesis.Case, app: FastAPI) -> None:
    response = case.call(app=app)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} answered {response.status_code}\n"
        f"reproduce: {case.as_curl_command()}\n{response.text[:2000]}"
    )
    case.validate_response(response, checks=[status_code_conformance, response_schema_conformance])


def test_every_route_is_an_operation() -> None:
    """Every operation of the app's document (tests/test_app.py pins that it lists every
    route) parametrizes test_every_operation: one schemathesis cannot read would be
    left out of it."""
    document = make_app(warehouse=None).openapi()
    listed = {(m.upper(), path) for path, item in document["paths"].items() for m in item}
    operations = {(op.method.upper(), op.path) for op in map(ok, schema.get_all_operations())}
    assert operations == listed


def ok(result: Ok[Any] | Err[Exception]) -> Any:
    """The operation of a schemathesis result; an operation it could not read fails."""
    assert isinstance(result, Ok), f"schemathesis cannot read an operation: {result.err()}"
    return result.ok()


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_the_document_describes_every_body() -> None:
    """The bodies the routes read raw (ingest) are in the document, with the event's
    fields, as well as the one FastAPI reads (reprocess)."""
    document = make_app(warehouse=None).openapi()
    bodies = {
        (method, path): op["requestBody"]
        for path, item in document["paths"].items()
        for method, op in item.items()
        if "requestBody" in op
    }
    assert set(bodies) == {
        ("post", "/v1/events"),
        ("post", "/v1/logs"),
        ("post", "/v1/admin/reprocess"),
        ("post", "/api/event"),
        ("post", "/v1/sites"),
        ("post", "/api/v2/query"),
    }
    events = bodies["post", "/v1/events"]["content"]
    assert set(events) == {"application/json", "application/x-ndjson"}
    forms = events["application/json"]["schema"]["anyOf"]
    assert {"$ref": EVENT_REF["$ref"]} in forms
    assert {"type": "array", "items": EVENT_REF, "maxItems": 200_000} in forms
    event = document["components"]["schemas"]["Event"]
    assert list(event["properties"]) == EVENT_SCHEMA.names
    assert event["required"] == ["site"]
    assert set(bodies["post", "/v1/logs"]["content"]) == {"text/plain"}
    assert set(bodies["post", "/v1/admin/reprocess"]["content"]) == {"application/json"}


def test_the_document_lists_every_choice() -> None:
    document = make_app(warehouse=None).openapi()
    params = {
        (path, p["name"]): resolve(document, p["schema"])
        for path, item in document["paths"].items()
        for op in item.values()
        for p in op.get("parameters", [])
    }
    assert params["/v1/sites/{site}/traffic", "interval"]["enum"] == [
        "minute",
        "hour",
        "day",
        "week",
        "month",
    ]
    assert tuple(params["/v1/sites/{site}/traffic", "interval"]["enum"]) == series.INTERVALS
    assert params["/v1/sites/{site}/traffic", "format"]["enum"] == ["json", "csv"]
    assert params["/v1/admin/process", "mode"]["enum"] == ["due", "closed", "all"]


def test_csv_answer_is_documented() -> None:
    operation = make_app(warehouse=None).openapi()["paths"]["/v1/sites/{site}/traffic"]["get"]
    assert "text/csv" in operation["responses"]["200"]["content"]


def test_ndjson_null_first_line() -> None:
    """Run in a child process: Arrow's JSON reader crashes the process on a leading
    null (apache/arrow#47409), so the fast path must never hand it one."""
    code = (
        "import httpx, asyncio\n"
        "from tests.test_schema import make_app\n"
        "async def main():\n"
        "    transport = httpx.ASGITransport(app=make_app(warehouse=None))\n"
        "    async with httpx.AsyncClient(transport=transport, base_url='http://t') as c:\n"
        "        r = await c.post('/v1/events', content=b'null\\n',\n"
        "                         headers={'Content-Type': 'application/x-ndjson'})\n"
        "        print(r.status_code)\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"the API process died ({done.returncode}): {done.stderr[-800:]}"
    assert done.stdout.strip() == "422"
