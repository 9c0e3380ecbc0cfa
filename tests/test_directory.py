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
