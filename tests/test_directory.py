"""The directory's actor lookups leave the event loop free (no Ray needed: the lookup
itself is replaced by a slow stand-in)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from flowray.actors import directory as directory_module
from flowray.actors.directory import Directory
from flowray.config import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def slow_lookup(seconds: float, seen: list[tuple[str, str]]) -> Any:
    def get_actor(name: str, namespace: str) -> object:
        seen.append((name, namespace))
        assert threading.current_thread() is not threading.main_thread(), "on the loop"
        time.sleep(seconds)
        return ("handle", name)

    return get_actor


@pytest.mark.anyio
async def test_a_lookup_runs_off_the_event_loop_and_is_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(directory_module.ray, "get_actor", slow_lookup(0.3, seen))
    directory = Directory(Settings(groups=2, replicas=3, namespace="ns-a"))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    handle = await directory.handle_async(1, 2)
    task.cancel()
    assert handle == ("handle", "flowray-g001-r2") and seen == [("flowray-g001-r2", "ns-a")]
    assert ticks >= 10, f"the loop ran {ticks} ticks of 10 ms during a 300 ms lookup"
    assert await directory.handle_async(1, 2) is handle and len(seen) == 1, "remembered"
    assert directory.handle(1, 2) is handle


@pytest.mark.anyio
async def test_a_lookup_that_hangs_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module.ray, "get_actor", slow_lookup(1.0, []))
    directory = Directory(Settings(rpc_timeout_s=0.1))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await directory.handle_async(0, 0)
    assert time.monotonic() - started < 0.8


@pytest.mark.anyio
async def test_callers_share_one_lookup_and_a_hung_one_starves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From a review: each timed-out lookup kept a thread of the default pool, which the
    ingress parses on. Now lookups of one replica are shared, on threads of their own."""
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(directory_module.ray, "get_actor", slow_lookup(1.5, seen))
    directory = Directory(Settings(rpc_timeout_s=0.2))
    results = await asyncio.gather(
        *(directory.handle_async(0, 0) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, TimeoutError) for r in results)
    assert len(seen) == 1, "ten callers, one lookup"
    started = time.monotonic()
    assert await asyncio.to_thread(lambda: 7) == 7
    assert time.monotonic() - started < 0.5, "the default pool is free"
    await asyncio.sleep(1.5)  # the lookup ends: its handle is kept for the next caller
    assert await directory.handle_async(0, 0) == ("handle", "flowray-g000-r0")
    assert len(seen) == 1


@pytest.mark.anyio
async def test_a_master_that_cannot_be_looked_up_is_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str, namespace: str) -> object:
        raise ValueError(f"Failed to look up actor {name}")

    monkeypatch.setattr(directory_module.ray, "get_actor", missing)
    directory = Directory(Settings())
    directory.forget(0, hint=2)  # a replica named replica 2 the master
    with pytest.raises(directory_module.NoMaster, match="replica 2"):
        await directory.master(0)
    assert 0 not in directory._master, "the next call asks the replicas again"
