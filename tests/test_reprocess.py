"""Re-processing history with a user's logic, on a real cluster: the diff it reports,
the atomic version switch (queries and the Redis cache follow it at once), processing
of new hours with the current version's logic, rollback, and a processor killed in the
middle of a job. Every figure is checked against DuckDB counts of the raw events."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import duckdb
import httpx
import pyarrow as pa
import pytest
import ray
from typer.testing import CliRunner

from flowray.cli import app as cli_app
from flowray.cluster import control as cluster
from flowray.ingest.events import EVENT_SCHEMA
from tests.helpers import cluster_settings, kill9, running_cluster
from tests.logic_bots import BOT_PATTERN

HOUR_MS = 3_600_000
H0 = 1_584_169_200_000  # 2020-03-14T07:00:00Z
SITES = [f"shop{i}.example" for i in range(16)]
MODULE = "tests.logic_bots"
UAS = ["Mozilla/5.0 (X11; Linux)", "Googlebot/2.1", "Mozilla/5.0 (iPhone)", "AhrefsBot", None]
JOB_TIMEOUT_S = 120.0


def make_events(rng: random.Random, hour_ms: int, n: int, tag: str) -> list[dict[str, Any]]:
    """Events in one hour: some bots, about half with ids, some of those sent twice."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        event: dict[str, Any] = {
            "ts": hour_ms + rng.randrange(HOUR_MS),
            "site": rng.choice(SITES),
            "ua": rng.choice(UAS),
        }
        if rng.random() < 0.5:
            event["id"] = f"{tag}-{i}"
        out.append({k: v for k, v in event.items() if v is not None})
        if "id" in event and rng.random() < 0.2:
            out.append(dict(out[-1]))
    return out


def expected_counts(
    raw: list[dict[str, Any]], no_bots: bool, lo_ms: int, hi_ms: int
) -> dict[tuple[str, int], int]:
    """(site, minute ms) -> count, by DuckDB over the raw events: the logic (bots out,
    or not) filters events, then each (site, id) counts once."""
    con = duckdb.connect()
    con.register("raw_events", pa.Table.from_pylist(raw, schema=EVENT_SCHEMA))
    keep = f"NOT regexp_matches(coalesce(ua, ''), '{BOT_PATTERN}')" if no_bots else "TRUE"
    rows = con.sql(
        f"WITH kept AS (SELECT * FROM raw_events WHERE {keep}),"
        " once AS (SELECT site, ts FROM kept WHERE id IS NULL"
        "  UNION ALL SELECT site, min(ts) FROM kept WHERE id IS NOT NULL GROUP BY site, id)"
        " SELECT site, ts // 60000 * 60000 AS m, count(*) FROM once"
        f" WHERE ts >= {lo_ms} AND ts < {hi_ms} GROUP BY ALL"
    ).fetchall()
    return {(site, int(m)): int(c) for site, m, c in rows}


def served(client: httpx.Client, lo_ms: int, hi_ms: int) -> dict[tuple[str, int], int]:
    """Every site's minute counts in [lo_ms, hi_ms) as the API answers them."""
    out = {}
    for site in SITES:
        r = client.get(
            f"/v1/sites/{site}/traffic",
            params={"start": str(lo_ms), "end": str(hi_ms), "interval": "minute"},
        )
        assert r.status_code == 200, r.text
        for p in r.json()["points"]:
            if p["count"]:
                minute = datetime.fromisoformat(p["t"].replace("Z", "+00:00"))
                out[(site, int(minute.timestamp() * 1000))] = p["count"]
    return out


def per_site_diff(
    before: dict[tuple[str, int], int], after: dict[tuple[str, int], int], sites: list[str]
) -> dict[str, tuple[int, int, int]]:
    """site -> (buckets changed, total before, total after), for sites that changed."""
    out = {}
    for site in sites:
        keys = {k for k in before.keys() | after.keys() if k[0] == site}
        changed = sum(1 for k in keys if before.get(k, 0) != after.get(k, 0))
        b = sum(v for k, v in before.items() if k[0] == site)
        a = sum(v for k, v in after.items() if k[0] == site)
        if changed or a != b:
            out[site] = (changed, b, a)
    return out


def cli(*args: str) -> Any:
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def rp_cluster(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str, list[dict[str, Any]]]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("reprocess"),
        serve_port,
        redis_url,
        "flowray-reprocess",
        shards=4,
        reduce_keys=2,
    )
    rng = random.Random(7)
    raw = [e for h in range(3) for e in make_events(rng, H0 + h * HOUR_MS, 1500, f"h{h}")]
    rng.shuffle(raw)
    with running_cluster(settings) as (running, url):
        with httpx.Client(base_url=url, timeout=60) as client:
            for lo in range(0, len(raw), 500):
                assert client.post("/v1/events", json=raw[lo : lo + 500]).status_code == 200
            result = client.post("/v1/admin/process", params={"mode": "closed"}).json()
            assert result["units"] == 3 * 4, result
        yield running, url, raw


def wait_job(client: httpx.Client, started: httpx.Response) -> dict[str, Any]:
    assert started.status_code == 202, started.text
    job = started.json()["job"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        state = client.get(f"/v1/admin/jobs/{job}").json()
        if state["state"] != "running":
            assert state["state"] == "done", state["error"]
            result: dict[str, Any] = state["result"]
            return result
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def test_reprocess_diff_switch_new_hours_and_rollback(
    rp_cluster: tuple[cluster.Cluster, str, list[dict[str, Any]]],
) -> None:
    _running, url, raw = rp_cluster
    end = H0 + 4 * HOUR_MS
    default_all = expected_counts(raw, False, H0, end)
    with httpx.Client(base_url=url, timeout=60) as client:
        assert served(client, H0, end) == default_all  # and now cached in Redis
        h1 = (H0 + HOUR_MS, H0 + 2 * HOUR_MS)

        # A dry run reports exactly what would change and publishes nothing.
        body = {
            "start": str(h1[0] + 10 * 60_000),  # inside the hour: whole hours are redone
            "end": str(h1[1] - 60_000),
            "logic": "no-bots",
            "logic_modules": [MODULE],
            "dry_run": True,
        }
        dry = wait_job(client, client.post("/v1/admin/reprocess", json=body))
        want = per_site_diff(
            expected_counts(raw, False, *h1), expected_counts(raw, True, *h1), SITES
        )
        got = {c["site"]: (c["buckets_changed"], c["before"], c["after"]) for c in dry["changes"]}
        assert got == want and want
        assert dry["version"] is None and dry["units"] == 4
        assert [v["version"] for v in client.get("/v1/admin/versions").json()] == [1]
        assert served(client, H0, end) == default_all

        # The real run, through the CLI: a new version, current at once, cache included.
        out = cli(
            "reprocess",
            "--url",
            url,
            "--start",
            "2020-03-14T08:00:00Z",
            "--end",
            "2020-03-14T09:00:00Z",
            "--logic",
            "no-bots",
            "--logic-module",
            MODULE,
        ).output
        assert "published version 2" in out and "sites changed" in out
        v2 = {**default_all, **{k: 0 for k in default_all if h1[0] <= k[1] < h1[1]}}
        v2.update(expected_counts(raw, True, *h1))
        v2 = {k: c for k, c in v2.items() if c}
        assert served(client, H0, end) == v2

        # Only two sites of the third hour: the others keep their numbers.
        h2 = (H0 + 2 * HOUR_MS, H0 + 3 * HOUR_MS)
        chosen = SITES[3:5]
        body = {"start": str(h2[0]), "end": str(h2[1]), "sites": chosen, "logic": "no-bots"}
        started = client.post("/v1/admin/reprocess", json=body)
        # Not named this time: the module that registers no-bots is remembered, so map
        # tasks in fresh worker processes import it too.
        assert MODULE in started.json()["params"]["modules"]
        third = wait_job(client, started)
        assert third["version"] == 3 and third["sites_examined"] == 2
        v3 = dict(v2)
        for k in [k for k in v3 if k[0] in chosen and h2[0] <= k[1] < h2[1]]:
            del v3[k]
        v3.update({k: c for k, c in expected_counts(raw, True, *h2).items() if k[0] in chosen})
        assert served(client, H0, end) == v3

        # A new hour is processed with the current version's logic (no-bots).
        rng = random.Random(11)
        h3 = (H0 + 3 * HOUR_MS, end)
        fresh = make_events(rng, h3[0], 800, "h3")
        assert client.post("/v1/events", json=fresh).status_code == 200
        assert client.post("/v1/admin/process", params={"mode": "closed"}).json()["units"]
        raw_all = raw + fresh
        assert served(client, *h3) == expected_counts(raw_all, True, *h3)

        # Back to version 1: its hours as they were, the new hour re-made with "default".
        out = cli("rollback", "--url", url, "--to", "1").output
        assert "version 1 (logic default) is current again" in out
        assert served(client, H0, end) == expected_counts(raw_all, False, H0, end)
        versions = client.get("/v1/admin/versions").json()
        assert [(v["version"], v["current"], v["logic"]) for v in versions] == [
            (1, True, "default"),
            (2, False, "no-bots"),
            (3, False, "no-bots"),
        ]
        # Version 1 has no parent: nothing to roll back to, said clearly.
        r = client.post("/v1/admin/rollback")
        assert r.status_code == 422 and "no previous version" in r.json()["error"]


def test_bad_requests_are_refused_clearly(
    rp_cluster: tuple[cluster.Cluster, str, list[dict[str, Any]]],
) -> None:
    _running, url, _raw = rp_cluster
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post(
            "/v1/admin/reprocess", json={"start": "2020-03-14", "end": "2020-03-15", "logic": "x"}
        )
        assert r.status_code == 422 and "unknown processing logic 'x'" in r.json()["error"]
        r = client.post(
            "/v1/admin/reprocess",
            json={"start": "2020-03-14", "end": "2020-03-15", "logic_modules": ["no.such.mod"]},
        )
        assert r.status_code == 422 and "cannot import logic module" in r.json()["error"]
        r = client.post("/v1/admin/reprocess", json={"start": "2020-03-15", "end": "2020-03-14"})
        assert r.status_code == 422 and "end must be after start" in r.json()["error"]
        r = client.post("/v1/admin/rollback", params={"to": 99})
        assert r.status_code == 422 and "no warehouse version 99" in r.json()["error"]
        assert client.get("/v1/admin/jobs/nope").status_code == 404


def test_a_processor_killed_mid_job_publishes_nothing(
    rp_cluster: tuple[cluster.Cluster, str, list[dict[str, Any]]],
) -> None:
    _running, url, raw = rp_cluster
    with httpx.Client(base_url=url, timeout=60) as client:
        before_versions = client.get("/v1/admin/versions").json()
        before = served(client, H0, H0 + 3 * HOUR_MS)
        body = {
            "start": str(H0),
            "end": str(H0 + 3 * HOUR_MS),
            "logic": "slow-no-bots",
            "logic_modules": [MODULE],
        }
        started = client.post("/v1/admin/reprocess", json=body)
        assert started.status_code == 202, started.text
        job = started.json()["job"]
        time.sleep(1.0)  # map tasks are inside the slow logic now
        assert client.get(f"/v1/admin/jobs/{job}").json()["state"] == "running"
        kill9(client.get("/v1/admin/status").json()["processor"]["pid"])
        deadline = time.monotonic() + 60
        while True:  # Ray restarts the processor; the job is gone with it
            r = client.get(f"/v1/admin/jobs/{job}")
            if r.status_code == 404:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.3)
        assert client.get("/v1/admin/versions").json() == before_versions
        assert served(client, H0, H0 + 3 * HOUR_MS) == before
        # and the same run, left alone, completes
        body["logic"] = "no-bots"
        result = wait_job(client, client.post("/v1/admin/reprocess", json=body))
        assert result["version"] == len(before_versions) + 1
        assert served(client, H0, H0 + 3 * HOUR_MS) == expected_counts(
            raw, True, H0, H0 + 3 * HOUR_MS
        )


def test_compaction_merges_final_days_and_answers_the_same(
    rp_cluster: tuple[cluster.Cluster, str, list[dict[str, Any]]],
) -> None:
    running, url, _raw = rp_cluster
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/v1/admin/process", params={"mode": "closed"})  # sets the watermark
        before = served(client, H0, H0 + 4 * HOUR_MS)
        merged = ray.get(running.processor.compact.remote(), timeout=120)
        assert merged == 4  # one day, four shards, each with several hours
        assert ray.get(running.processor.compact.remote(), timeout=120) == 0  # all done
        time.sleep(1.2)
        assert served(client, H0, H0 + 4 * HOUR_MS) == before
        status = client.get("/v1/admin/status").json()
        assert status["processor"]["merged_days"] == 4
