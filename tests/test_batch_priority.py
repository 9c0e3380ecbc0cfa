"""Processing tasks run at a lower CPU priority, in workers no actor ever gets."""

from __future__ import annotations

import os

import pytest
import ray

from flowray.tasks.mapreduce import BATCH_NICENESS, worker_niceness

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
class _Plain:
    def niceness(self) -> int:
        return os.nice(0)


def test_batch_tasks_are_niced_and_actors_are_not(ray_session: None) -> None:
    first = _Plain.remote()  # type: ignore[attr-defined]
    base = ray.get(first.niceness.remote(), timeout=120)
    ray.kill(first)
    assert base < 19, "Ray's workers already run at the lowest priority"
    seen = ray.get([worker_niceness.remote() for _ in range(6)], timeout=120)
    assert all(n == min(19, base + BATCH_NICENESS) for n in seen), (base, seen)
    # Actors created afterwards (as Ray restarts replicas) do not land in those
    # workers: they run at the priority Ray gives its workers.
    actors = [_Plain.remote() for _ in range(3)]  # type: ignore[attr-defined]
    try:
        assert ray.get([a.niceness.remote() for a in actors], timeout=120) == [base] * 3
    finally:
        for a in actors:
            ray.kill(a)
