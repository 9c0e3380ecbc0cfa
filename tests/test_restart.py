"""Rolling restart under load: every replica, the processor, the ingest gateway and
the Serve replica are replaced one at a time (mastership handed over, not lost) while
a client keeps ingesting with unique ids; afterwards every acknowledged event is
counted exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import duckdb
import httpx
import orjson
import pytest
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from typer.testing import CliRunner

from flowray.cli import app as cli_app
from flowray.client import Client
from flowray.cluster import control as cluster
from flowray.warehouse.catalog import Catalog
from tests.helpers import cluster_settings, kill9, running_cluster, status

HOUR_MS = 3_600_000
H0 = 1_584_169_200_000  # 2020-03-14T07:00:00Z
BATCH = 40


def event(i: int) -> dict[str, Any]:
    """Event i alone in its (site, minute) bucket, so a count of 1 there names it."""
    return {"ts": H0 + (i % 60) * 60_000, "site": f"r{i // 60}.example", "id": f"e{i}"}


class Load(threading.Thread):
    """Sends batches through the ingest gateway until stopped, retrying 503s."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.acked: set[int] = set()
        self.batches = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        i = 0
        try:
            with Client(self.url, timeout_s=30) as client:
                while not self.stop.is_set():
                    numbers = list(range(i, i + BATCH))
                    body = orjson.dumps([event(n) for n in numbers])
                    client.post_with_retry("/v1/events", body, "application/json")
                    self.acked.update(numbers)
                    self.batches += 1
                    i += BATCH
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.fixture(scope="module")
def restart_cluster(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("restart"), serve_port, redis_url, "flowray-restart", groups=2
    )
    with running_cluster(settings) as running:
        yield running


def _pids(url: str) -> dict[str, int]:
    body = status(url)
    out = {
        f"g{g['group']}r{r['replica']}": int(r["pid"])
        for g in body["groups"]
        for r in g["replicas"]
    }
    out["processor"] = int(body["processor"]["pid"])
    with httpx.Client(base_url=url, timeout=10) as client:
        out["serve"] = int(client.get("/healthz").json()["pid"])
    return out


def test_rolling_restart_under_load_loses_nothing(
    restart_cluster: tuple[cluster.Cluster, str],
) -> None:
    running, url = restart_cluster
    gateway = f"http://127.0.0.1:{running.settings.ingest_port}"
    before = _pids(url)
    load = Load(gateway)
    load.start()
    try:
        result = CliRunner().invoke(cli_app, ["restart", "--rolling", "--url", url])
        assert result.exit_code == 0, result.output
        assert "rolling restart done" in result.output
        assert "mastership handed over" in result.output
        sent_during = load.batches
    finally:
        load.stop.set()
        load.join(timeout=120)
    assert load.error is None, repr(load.error)
    assert sent_during > 0, "the client was acknowledged during the restart"
    after = _pids(url)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == set(before), f"not replaced: {set(before) - changed}"

    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.post("/v1/admin/process", params={"mode": "closed"}).status_code == 200
    catalog = Catalog(running.settings.warehouse_dir / "catalog.sqlite")
    paths = [u.path for u in catalog.units(catalog.current_version())]
    catalog.close()
    rows = duckdb.sql(
        "SELECT site, epoch_ms(minute), count FROM read_parquet($p)", params={"p": paths}
    ).fetchall()
    counted = {int(site[1:].split(".")[0]) * 60 + (m - H0) // 60_000: c for site, m, c in rows}
    assert load.acked - counted.keys() == set(), "acknowledged events were lost"
    assert all(c == 1 for c in counted.values()), "an event was counted twice"
    assert counted.keys() == load.acked  # nothing unacknowledged (all batches ended acked)


def test_a_gateway_killed_comes_back_serving(
    restart_cluster: tuple[cluster.Cluster, str],
) -> None:
    running, _url = restart_cluster
    gateway = running.gateways[0]
    before = ray.get(gateway.ping.remote(), timeout=30)
    assert before["started"]
    kill9(before["pid"])
    deadline = time.monotonic() + 60
    while True:  # Ray restarts the actor, without the server that start() began
        try:
            after = ray.get(gateway.ping.remote(), timeout=10)
            if after["pid"] != before["pid"]:
                break
        except (RayActorError, ActorUnavailableError, GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the gateway actor did not come back"
        time.sleep(0.3)
    assert not after["started"]
    # Meanwhile the other gateway, on the same port, takes every new connection.
    assert running.settings.gateways >= 2
    port = running.settings.ingest_port
    body = orjson.dumps([event(10_000_000 + i) for i in range(BATCH)])
    for _ in range(20):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/healthz").status_code == 200
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        answer = client.post(
            "/v1/events", content=body, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
    # The processor's cycle notices and starts it again.
    assert ray.get(running.processor.keep_gateway.remote(), timeout=60) is True
    assert ray.get(running.processor.keep_gateway.remote(), timeout=60) is False
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    # and it found every group's master and connected to it before a first write
    deadline = time.monotonic() + 30
    while (warmed := ray.get(gateway.ping.remote(), timeout=10)["warmed"]) is None:
        assert time.monotonic() < deadline, "the gateway did not finish warming"
        time.sleep(0.2)
    assert warmed == running.settings.groups
