"""Replica placement: distinct nodes when the cluster has them, packed in local mode;
and a node lost while a client ingests loses no acknowledged event (on a simulated
multi-node Ray cluster, in a process of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowray.cluster.control import placement_strategy

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("replicas", "nodes", "strategy"),
    [
        (3, 1, None),  # local mode: one node, replicas pack
        (1, 5, None),
        (3, 2, "SPREAD"),  # not enough nodes: as distinct as they can be
        (3, 3, "STRICT_SPREAD"),
        (3, 10, "STRICT_SPREAD"),
        (5, 4, "SPREAD"),
    ],
)
def test_placement_strategy(replicas: int, nodes: int, strategy: str | None) -> None:
    assert placement_strategy(replicas, nodes) == strategy


def test_a_node_lost_while_ingesting_loses_no_acknowledged_event(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_check.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["nodes_of_replicas"] == 3, seen  # one replica per node
    assert seen["replica_nodes_after"] == 3, seen  # the lost one re-placed on the spare
    assert seen["acked"] > 0
    assert seen["acked_missing"] == 0, seen
    assert seen["counted_more_than_once"] == 0, seen
    assert seen["published_events"] == seen["counted_events"] >= seen["acked"]
