"""Faults for real: kill -9 replica processes while a client ingests with unique ids.

Every acknowledged event must appear in the processed counts exactly once; writes must
resume after a master dies; with a majority down nothing is acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from flowray.actors.names import actor_name
from flowray.actors.replica import Replica
from flowray.cluster import control as cluster
from flowray.config import Settings
from flowray.ingest.events import EVENT_SCHEMA
from flowray.ingest.pieces import to_ipc
from flowray.storage import segment
from flowray.storage.segment import KIND_DATA
from tests.helpers import (
    cluster_settings,
    kill9,
    kill_for_good,
    replica_pid,
    running_cluster,
    status,
)
from tests.writers import HOUR_MS, Writer, check_exactly_once

HOURS = {"m": 1_714_600_800_000, "f": 1_714_600_800_000 + HOUR_MS}  # hours long past


@pytest.fixture(scope="module")
def failover_cluster(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("failover"),
        serve_port,
        redis_url,
        "flowray-failover",
        groups=2,
        shards=4,
        commit_timeout_s=3.0,
    )
    with running_cluster(settings) as running:
        yield running


def _ingest_through(
    url: str, tag: str, fault: Any, seconds_before: float = 1.5, seconds_after: float = 4.0
) -> Writer:
    writer = Writer(url, tag, HOURS[tag])
    writer.start()
    time.sleep(seconds_before)
    fault()
    time.sleep(seconds_after)
    writer.stop.set()
    writer.join(timeout=120)
    assert not writer.is_alive()
    assert len(writer.acked) > 1000, "the writer made too little progress to prove anything"
    return writer


def _check_exactly_once(url: str, acked: list[dict[str, Any]], tag: str) -> None:
    check_exactly_once(url, acked, HOURS[tag])


def test_kill_master_loses_nothing_and_counts_nothing_twice(
    failover_cluster: tuple[cluster.Cluster, str],
) -> None:
    _running, url = failover_cluster
    old = replica_pid(url, 0, "master")
    term_before = _metric(url, 'flowray_group_term{group="0"}')
    writer = _ingest_through(url, "m", lambda: kill9(old))
    new = replica_pid(url, 0, "master")
    assert new != old
    # What an operator sees: a higher term, and the group has a master again.
    assert _metric(url, 'flowray_group_term{group="0"}') > term_before
    assert _metric(url, 'flowray_group_has_master{group="0"}') == 1.0
    # Writes with ids are resent to the new master by the ingress, so the writer may
    # see no error at all; it must not have waited long for any acknowledgement.
    assert writer.longest_gap_s(since=writer.acked_at[0]) < 5.0
    _check_exactly_once(url, writer.acked, "m")


def _metric(url: str, series: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(series + " ")]
    assert len(values) == 1, (series, text[:2000])
    return float(values[0])


def test_kill_follower_loses_nothing(failover_cluster: tuple[cluster.Cluster, str]) -> None:
    _running, url = failover_cluster
    victim = replica_pid(url, 1, "follower")
    writer = _ingest_through(url, "f", lambda: kill9(victim))
    assert writer.errors[503] + writer.errors[0] < 5, "a follower's death should go unnoticed"
    _check_exactly_once(url, writer.acked, "f")


def test_restarted_replica_catches_up(failover_cluster: tuple[cluster.Cluster, str]) -> None:
    running, url = failover_cluster
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reps = [r for g in status(url)["groups"] for r in g["replicas"]]
        if all(r.get("role") in ("master", "follower") for r in reps):
            by_group: dict[int, set[int]] = {}
            for r in reps:
                by_group.setdefault(r["group"], set()).add(r["commit_index"])
            if all(len(v) == 1 for v in by_group.values()):
                break
        time.sleep(0.5)
    settings = running.settings
    for g in range(settings.groups):
        logs = [_log_on_disk(settings.replica_dir(g, r)) for r in range(settings.replicas)]
        assert logs[0] == logs[1] == logs[2], f"group {g}: replicas did not converge"


def _log_on_disk(root: Path) -> list[tuple[int, int, bytes]]:
    out = []
    for seg in sorted((root / "blocks").glob("s*/*.seg")):
        out += [
            (e.index, e.term, e.payload) for e in segment.read_entries(seg) if e.kind == KIND_DATA
        ]
    return sorted(out)


def test_majority_down_refuses_and_minority_down_writes(ray_session: None, tmp_path: Path) -> None:
    """One group without Serve: a minority down still commits; a majority down never
    acknowledges; when the replicas come back from their disks, writes resume."""
    settings = Settings(
        data_dir=tmp_path,
        groups=1,
        replicas=3,
        shards=1,
        namespace="flowray-quorum",
        commit_timeout_s=2.0,
    )
    running = cluster.start(settings, serve_app=False)
    try:
        master = running.masters()[0]
        followers = [r for r in range(3) if r != master]
        handle = running.replicas[(0, master)]
        one = pa.Table.from_pylist(
            [{"ts": 475_000 * 3_600_000, "site": "q.example"}], schema=EVENT_SCHEMA
        )
        piece = [(0, 475_000, to_ipc(one))]
        kill_for_good(running.replicas[(0, followers[0])])
        assert ray.get(handle.propose.remote(piece), timeout=30) > 0
        kill_for_good(running.replicas[(0, followers[1])])
        with pytest.raises(Exception) as refused:
            ray.get(handle.propose.remote(piece), timeout=30)
        assert "NoQuorum" in repr(refused.value) or "NotMaster" in repr(refused.value)
        blob = settings.to_json() | {"data_dir": str(settings.data_dir.resolve())}
        for f in followers:
            running.replicas[(0, f)] = Replica.options(  # type: ignore[attr-defined]
                name=actor_name(0, f), namespace=settings.namespace
            ).remote(blob, 0, f)
            ray.get(running.replicas[(0, f)].start.remote(), timeout=30)
        master = running.masters()[0]
        assert ray.get(running.replicas[(0, master)].propose.remote(piece), timeout=30) > 0
    finally:
        cluster.stop(running, serve_app=False)


def test_a_replica_that_lost_its_disk_abstains_until_caught_up(
    ray_session: None, tmp_path: Path
) -> None:
    """A follower's directory is deleted and its process killed: Ray restarts it with no
    state. It must not vote before it holds what was committed (it could help a
    candidate that lacks those entries win); it hears from the master, counts its vote
    in that term as the master's, catches up and then takes part as before."""
    settings = Settings(
        data_dir=tmp_path, groups=1, replicas=3, shards=1, namespace="flowray-lostdisk"
    )
    running = cluster.start(settings, serve_app=False)
    try:
        master = running.masters()[0]
        handle = running.replicas[(0, master)]
        rows = [{"ts": 475_000 * 3_600_000 + i, "site": "d.example"} for i in range(50)]
        piece = [(0, 475_000, to_ipc(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)))]
        for _ in range(5):
            assert ray.get(handle.propose.remote(piece), timeout=30) > 0
        lost = next(r for r in range(3) if r != master)
        victim = running.replicas[(0, lost)]
        before = ray.get(victim.status.remote(), timeout=30)
        assert before["abstaining"] is False
        shutil.rmtree(settings.replica_dir(0, lost))
        kill9(int(before["pid"]))
        deadline = time.monotonic() + 60
        while True:
            now = None
            with contextlib.suppress(RayActorError, ActorUnavailableError, GetTimeoutError):
                now = ray.get(victim.status.remote(), timeout=10)  # Ray may be restarting it
            if now is not None and now["pid"] != before["pid"] and not now["abstaining"]:
                commit = ray.get(handle.status.remote(), timeout=10)["commit_index"]
                assert now["last_index"] >= commit - 1  # caught up before it stopped abstaining
                break
            assert time.monotonic() < deadline, "the replica did not come back and catch up"
            time.sleep(0.2)
        state = json.loads((settings.replica_dir(0, lost) / "state.json").read_text())
        master_term = ray.get(handle.status.remote(), timeout=30)["term"]
        # Its vote in the master's term went to the master, as the rule says; it never
        # voted itself (a fresh replica that simply caught up would have voted_for None).
        assert state == {"term": master_term, "voted_for": master, "abstain": None}
        assert ray.get(handle.propose.remote(piece), timeout=30) > 0
        # Now the master dies; the two others elect one of them, and nothing is lost.
        kill_for_good(handle)
        survivors = [r for r in range(3) if r != master]
        deadline = time.monotonic() + 60
        while True:
            roles = {
                r: ray.get(running.replicas[(0, r)].leader.remote(), timeout=10)[2]
                for r in survivors
            }
            new = next((r for r, role in roles.items() if role == "master"), None)
            if new is not None:
                break
            assert time.monotonic() < deadline, f"no new master: {roles}"
            time.sleep(0.2)
        assert ray.get(running.replicas[(0, new)].propose.remote(piece), timeout=30) > 0
        logs = [_log_on_disk(settings.replica_dir(0, r)) for r in range(3) if r != master]
        assert len(logs[0]) >= 7 and logs[0] == logs[1]
    finally:
        cluster.stop(running, serve_app=False)
