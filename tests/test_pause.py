"""A master that stops without dying: paused with SIGSTOP, or its disk hung.

Several clients write batches with ids through both fronts (the Serve port and the
ingest gateway) while a replica is stopped for 6 s. Writes must resume within 2 s of
the stop (the followers elect a new master by time, and the ingress gives the silent
one up and resends); a paused follower must cost nothing; the old master, once it
runs again, must step down and catch up; and every acknowledged event must be counted
exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowray.cluster import control as cluster
from flowray.storage.replica_log import HANG_FLUSH_FILE
from tests.helpers import cluster_settings, running_cluster, status
from tests.writers import HOUR_MS, Writer, check_exactly_once

PAUSE_S = 6.0
RESUME_WITHIN_S = 2.0  # the bound on write unavailability after a stop
FOLLOWER_GAP_S_MAX = 0.5  # below the shortest election timeout: no failover was waited on
HOUR = 1_714_700_000_000 // HOUR_MS * HOUR_MS  # hours long past, one per test


@pytest.fixture(scope="module")
def pause_cluster(
    ray_session: None, redis_url: str, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("pause"),
        serve_port,
        redis_url,
        "flowray-pause",
        groups=2,
        shards=4,
        fault_injection=1,
    )
    with running_cluster(settings) as running:
        yield running


def _replica(url: str, group: int, role: str) -> dict[str, Any]:
    for g in status(url)["groups"]:
        if g["group"] == group:
            for r in g["replicas"]:
                if r.get("role") == role:
                    return r  # type: ignore[no-any-return]
    raise LookupError(f"no {role} in group {group}")


def _writers(running: cluster.Cluster, url: str, hour_ms: int, tag: str) -> list[Writer]:
    """Four clients, two on each front; their batches span both groups."""
    gateway = f"http://127.0.0.1:{running.settings.ingest_port}"
    return [Writer(u, f"{tag}{i}", hour_ms) for i, u in enumerate([url, gateway] * 2)]


def _write_through(writers: list[Writer], fault: Any, before_s: float = 1.5) -> float:
    """Run the writers, apply ``fault`` (which returns once it is over), write a little
    longer; returns when the fault began."""
    for w in writers:
        w.start()
    time.sleep(before_s)
    began = time.monotonic()
    fault()
    time.sleep(2.0)
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(timeout=120)
        assert not w.is_alive()
        assert len(w.acked) > 500, "a writer made too little progress to prove anything"
    return began


def _pause(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)
    finally:
        os.kill(pid, signal.SIGCONT)


def _caught_up(url: str, group: int, pid: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """Wait until replica ``pid`` of ``group`` is a follower holding the master's commits."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = next(g for g in status(url)["groups"] if g["group"] == group)["replicas"]
        me = next((r for r in replicas if r.get("pid") == pid), None)
        master = next((r for r in replicas if r.get("role") == "master"), None)
        if (
            me is not None
            and master is not None
            and me["role"] == "follower"
            and me["commit_index"] >= master["commit_index"] - 5
            and me["term"] == master["term"]
        ):
            return me
        assert time.monotonic() < deadline, f"replica {pid} did not step down and catch up"
        time.sleep(0.2)


def _gaps(writers: list[Writer], since: float) -> list[float]:
    return [round(w.longest_gap_s(since), 3) for w in writers]


def test_a_paused_master_is_replaced_within_two_seconds(
    pause_cluster: tuple[cluster.Cluster, str],
) -> None:
    running, url = pause_cluster
    old = _replica(url, 0, "master")
    writers = _writers(running, url, HOUR, "pm")
    began = _write_through(writers, lambda: _pause(int(old["pid"])))
    gaps = _gaps(writers, began)
    assert max(gaps) <= RESUME_WITHIN_S, f"longest waits for an acknowledgement: {gaps}"
    new = _replica(url, 0, "master")
    assert new["pid"] != old["pid"] and new["term"] > old["term"]
    _caught_up(url, 0, int(old["pid"]))
    check_exactly_once(url, [e for w in writers for e in w.acked], HOUR)


def test_a_paused_follower_costs_nothing(pause_cluster: tuple[cluster.Cluster, str]) -> None:
    running, url = pause_cluster
    master = _replica(url, 1, "master")
    follower = _replica(url, 1, "follower")
    writers = _writers(running, url, HOUR + HOUR_MS, "pf")
    began = _write_through(writers, lambda: _pause(int(follower["pid"])))
    gaps = _gaps(writers, began)
    assert max(gaps) < FOLLOWER_GAP_S_MAX, f"longest waits for an acknowledgement: {gaps}"
    assert sum(w.errors.total() for w in writers) == 0
    after = _replica(url, 1, "master")
    assert (after["pid"], after["term"]) == (master["pid"], master["term"]), "no election"
    _caught_up(url, 1, int(follower["pid"]))
    check_exactly_once(url, [e for w in writers for e in w.acked], HOUR + HOUR_MS)


def test_a_master_whose_disk_hangs_is_replaced_within_two_seconds(
    pause_cluster: tuple[cluster.Cluster, str],
) -> None:
    running, url = pause_cluster
    old = _replica(url, 1, "master")
    fault_file = Path(old["dir"]) / HANG_FLUSH_FILE

    def hang() -> None:
        fault_file.touch()
        try:
            time.sleep(PAUSE_S)
        finally:
            fault_file.unlink()

    writers = _writers(running, url, HOUR + 2 * HOUR_MS, "dh")
    began = _write_through(writers, hang)
    gaps = _gaps(writers, began)
    assert max(gaps) <= RESUME_WITHIN_S, f"longest waits for an acknowledgement: {gaps}"
    new = _replica(url, 1, "master")
    assert new["pid"] != old["pid"] and new["term"] > old["term"]
    _caught_up(url, 1, int(old["pid"]))
    check_exactly_once(url, [e for w in writers for e in w.acked], HOUR + 2 * HOUR_MS)
