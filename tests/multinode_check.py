"""Run by tests/test_placement.py in a process of its own (one Ray per process): a
simulated 4-node Ray cluster (ray.cluster_utils) on loopback, one flowray group of 3
replicas placed on distinct nodes; the node of a replica is removed while a client
ingests with unique ids; every acknowledged event must then be processed exactly once.

Prints one JSON line with what it saw; exits non-zero on any failure.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import duckdb  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from flowray.actors.directory import Directory  # noqa: E402
from flowray.api.app import Unavailable  # noqa: E402
from flowray.cluster import control as cluster  # noqa: E402
from flowray.config import Settings  # noqa: E402
from flowray.core.router import ShardMap  # noqa: E402
from flowray.ingest.events import EVENT_SCHEMA  # noqa: E402
from flowray.ingest.pieces import route  # noqa: E402
from flowray.serve.deployment import RayIngest  # noqa: E402
from flowray.warehouse.catalog import Catalog  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.ports import free_port  # noqa: E402

HOUR_MS = 3_600_000
BATCH = 50
NODE_ARGS = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False}


def event(i: int, hour_ms: int) -> dict[str, Any]:
    """Event i alone in its (site, minute) bucket, so a count of 1 there names it."""
    return {"ts": hour_ms + (i % 60) * 60_000, "site": f"n{i // 60}.example", "id": f"e{i}"}


async def ingest_until(
    ingest: RayIngest, shard_map: ShardMap, hour_ms: int, stop: asyncio.Event
) -> tuple[set[int], int]:
    """Send batches until ``stop``; (acknowledged event numbers, batches refused)."""
    acked: set[int] = set()
    refused = 0
    i = 0
    while not stop.is_set():
        numbers = list(range(i, i + BATCH))
        table = pa.Table.from_pylist([event(n, hour_ms) for n in numbers], schema=EVENT_SCHEMA)
        for _attempt in range(40):  # a client retrying with the same ids, as flowray's does
            try:
                await ingest.commit(route(table, shard_map))
                acked.update(numbers)
                break
            except Unavailable:
                refused += 1
                await asyncio.sleep(0.25)
        i += BATCH
        await asyncio.sleep(0.02)
    return acked, refused


async def scenario(settings: Settings, running: cluster.Cluster, nodes: Cluster) -> dict[str, Any]:
    shard_map = ShardMap.round_robin(settings.shards, settings.groups)
    ingest = RayIngest(settings, Directory(settings))
    hour_ms = (int(time.time() * 1000) // HOUR_MS - 5) * HOUR_MS
    status = ray.get([h.status.remote() for h in running.replicas.values()], timeout=30)
    placed = {st["node"] for st in status}
    # The replica to lose: the master when it is on a removable (worker) node, so that
    # the loss also forces a failover; else a follower on one.
    workers = {n.node_id: n for n in nodes.worker_nodes}
    on_workers = [st for st in status if st["node"] in workers]
    lost = min(on_workers, key=lambda st: st["role"] != "master")
    victim = workers[lost["node"]]
    stop = asyncio.Event()
    load = asyncio.create_task(ingest_until(ingest, shard_map, hour_ms, stop))
    await asyncio.sleep(2.0)
    nodes.remove_node(victim, allow_graceful=False)
    await asyncio.sleep(6.0)
    stop.set()
    acked, refused = await load
    # Ray restarts the lost replica on the spare node; wait for it to catch up.
    deadline = time.monotonic() + 120
    while True:
        try:
            after = ray.get([h.status.remote() for h in running.replicas.values()], timeout=10)
            commit = max(st["commit_index"] for st in after)
            if all(st["commit_index"] == commit for st in after):
                break
        except Exception:  # the restarted replica is not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the lost replica did not come back and catch up")
        await asyncio.sleep(1.0)
    # The processor may have been on the lost node too: Ray restarts it elsewhere, and
    # until it is back a call finds it restarting.
    deadline = time.monotonic() + 120
    while True:
        try:
            summary = ray.get(running.processor.run.remote("closed"), timeout=300)
            break
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)
    catalog = Catalog(settings.warehouse_dir / "catalog.sqlite")
    paths = [u.path for u in catalog.units(catalog.current_version())]
    rows = duckdb.sql(
        "SELECT site, epoch_ms(minute) AS m, count FROM read_parquet($paths)",
        params={"paths": paths},
    ).fetchall()
    counted = {int(site[1:].split(".")[0]) * 60 + (m - hour_ms) // 60_000: c for site, m, c in rows}
    return {
        "nodes_of_replicas": len(placed),
        "replica_nodes_after": len({st["node"] for st in after}),
        "lost_replica": f"{lost['replica']} ({lost['role']})",
        "acked": len(acked),
        "refused_batches": refused,
        "counted_events": sum(counted.values()),
        "acked_missing": len(acked - counted.keys()),
        "counted_more_than_once": sum(1 for c in counted.values() if c != 1),
        "published_events": summary["events"],
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="flowray-multinode-"))
    nodes = Cluster(
        initialize_head=True,
        head_node_args={**NODE_ARGS, "gcs_server_port": free_port()},
    )
    for _ in range(3):
        nodes.add_node(**NODE_ARGS)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace="flowray-multinode", log_to_driver=False)
    gcs = ray.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:"), gcs
    settings = Settings(
        data_dir=work / "data",
        namespace="flowray-multinode",
        groups=1,
        replicas=3,
        shards=2,
        redis_url="",
        seal_grace_s=0,
        process_interval_s=10**6,
        num_cpus=1,
        wait_nodes=4,
    )
    running = cluster.start(settings, serve_app=False)
    try:
        result = asyncio.run(scenario(running.settings, running, nodes))
    finally:
        cluster.stop(running, serve_app=False)
        ray.shutdown()
        nodes.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
