"""Moving a shard to another group while a client ingests: new writes follow the
catalog's map within a second, processing reads the shard's hours from every group
that has held it, and every acknowledged event is counted exactly once — also after
moving it back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest
from typer.testing import CliRunner

from flowray.cli import app as cli_app
from flowray.cluster import control as cluster
from flowray.core.router import shard_for_site
from flowray.warehouse.catalog import Catalog
from tests.helpers import cluster_settings, running_cluster
from tests.test_restart import H0, Load

SHARDS = 4


@pytest.fixture(scope="module")
def move_cluster(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("move"),
        serve_port,
        redis_url,
        "flowray-move",
        groups=2,
        shards=SHARDS,
    )
    with running_cluster(settings) as running:
        yield running


def _blocks_of_shard(data_dir: Path, group: int, shard: int) -> int:
    """Block files of ``shard`` in replica 0 of ``group`` (one per (shard, hour, part))."""
    root = data_dir / "groups" / f"g{group:03d}" / "r0"
    return sum(1 for p in root.rglob("*") if p.is_file() and f"s{shard:04d}" in str(p))


def _counted(settings_warehouse: Path) -> dict[int, int]:
    catalog = Catalog(settings_warehouse / "catalog.sqlite")
    paths = [u.path for u in catalog.units(catalog.current_version())]
    catalog.close()
    rows = duckdb.sql(
        "SELECT site, epoch_ms(minute), count FROM read_parquet($p)", params={"p": paths}
    ).fetchall()
    return {int(site[1:].split(".")[0]) * 60 + (m - H0) // 60_000: c for site, m, c in rows}


def test_moving_a_shard_there_and_back_under_load_counts_everything_once(
    move_cluster: tuple[cluster.Cluster, str],
) -> None:
    running, url = move_cluster
    s = running.settings
    gateway = f"http://127.0.0.1:{s.ingest_port}"
    runner = CliRunner()
    load = Load(gateway)
    load.start()
    try:
        time.sleep(1.5)
        result = runner.invoke(cli_app, ["move-shard", "1", "--to", "0", "--url", url])
        assert result.exit_code == 0, result.output
        assert "shard 1: group 1 -> 0" in result.output
        time.sleep(3.0)  # routing follows within a second; keep writing meanwhile
        with httpx.Client(base_url=url, timeout=120) as client:
            # half-way: publish what is there, the moved shard from both groups
            assert client.post("/v1/admin/process", params={"mode": "all"}).status_code == 200
            status = client.get("/v1/admin/status").json()
            assert status["processor"]["shard_owners"] == [0, 0, 0, 1]
        result = runner.invoke(cli_app, ["move-shard", "1", "--to", "1", "--url", url])
        assert result.exit_code == 0, result.output
        time.sleep(2.0)
    finally:
        load.stop.set()
        load.join(timeout=120)
    assert load.error is None, repr(load.error)
    # Shard 1 was written by group 1, then group 0, then group 1 again.
    assert _blocks_of_shard(s.data_dir, 0, 1) > 0, "group 0 never took shard 1's writes"
    assert _blocks_of_shard(s.data_dir, 1, 1) > 0
    assert any(shard_for_site(f"r{i}.example", SHARDS) == 1 for i in range(50))
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.post("/v1/admin/process", params={"mode": "all"}).status_code == 200
        r = client.post("/v1/admin/shards/1/move", params={"to": 1})
        assert r.status_code == 422 and "already" in r.json()["error"]
        r = client.post("/v1/admin/shards/9/move", params={"to": 0})
        assert r.status_code == 422 and "no shard 9" in r.json()["error"]
    counted = _counted(s.warehouse_dir)
    assert load.acked - counted.keys() == set(), "acknowledged events were lost"
    assert all(c == 1 for c in counted.values()), "an event was counted twice"
    assert counted.keys() == load.acked
