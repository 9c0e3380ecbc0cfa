"""Thousands of seeded runs of the replication simulator (see flowray/testing/simulator.py).

A failure message names its seed; ``python -m flowray.testing.simulator --seed N`` replays it.
FLOWRAY_SIM_SEEDS sets how many three-replica seeds run (five-replica: a fifth).
"""

from __future__ import annotations

import os

import pytest

from flowray.testing.simulator import Simulation, run_seed

SEEDS = int(os.environ.get("FLOWRAY_SIM_SEEDS", "2000"))
CHUNK = 100


@pytest.mark.parametrize("first", range(0, SEEDS, CHUNK))
def test_three_replicas(first: int) -> None:
    acked = 0
    for seed in range(first, min(first + CHUNK, SEEDS)):
        acked += len(run_seed(seed, steps=400, replicas=3).acked)
    assert acked > 0, "the simulated clients got nothing acknowledged: the test is vacuous"


@pytest.mark.parametrize("first", range(100_000, 100_000 + SEEDS // 5, CHUNK))
def test_five_replicas(first: int) -> None:
    acked = 0
    for seed in range(first, min(first + CHUNK, 100_000 + SEEDS // 5)):
        acked += len(run_seed(seed, steps=400, replicas=5).acked)
    assert acked > 0


def test_a_seed_replays_exactly() -> None:
    a, b = run_seed(4242), run_seed(4242)
    assert a.acked == b.acked and a.committed == b.committed
    assert [d.entries for d in a.disks.values()] == [d.entries for d in b.disks.values()]


def test_faults_really_happen() -> None:
    """The schedules must exercise failover: masters change and writes still commit."""
    terms, acked = 0, 0
    for seed in range(50):
        sim = run_seed(seed)
        terms += len(sim.leaders)
        acked += len(sim.acked)
    assert terms > 50 * 2, "almost no elections: the fault schedule is too gentle"
    assert acked > 50 * 20


def test_pauses_really_happen() -> None:
    """Processes pause, masters among them, and long pauses are checked on resume."""
    pauses, master_pauses, checked = 0, 0, 0
    for seed in range(100):
        sim = run_seed(seed)
        pauses += sim.pauses
        master_pauses += sim.master_pauses
        checked += sim.stepped_down_after_pause
    assert pauses > 100, "almost no pauses: the fault schedule is too gentle"
    assert master_pauses > 20
    assert checked > 20, "too few long pauses to check that a resumed master steps down"


def test_a_single_replica_group_commits_alone() -> None:
    sim = Simulation(7, replicas=1)
    for _ in range(100):
        sim.step()
    sim.settle()
    assert sim.acked
