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


class _Answers:
    """Replica handles whose ``leader`` answers are set by the test."""

    def __init__(self, answers: dict[int, tuple[int | None, int, str]]) -> None:
        self.answers = answers

    def handle(self, replica: int) -> object:
        answers = self.answers

        class _Method:
            @staticmethod
            def remote() -> object:
                async def answer() -> tuple[int | None, int, str]:
                    return answers[replica]

                return answer()

        class _Handle:
            leader = _Method()

        return _Handle()


@pytest.mark.anyio
async def test_a_suspected_master_is_passed_over_until_a_newer_term(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Followers that have not noticed their master's silence still name it; once it is
    suspected the lookup waits for the election instead of returning to it."""
    replicas = _Answers({0: (0, 3, "master"), 1: (0, 3, "follower"), 2: (0, 3, "follower")})
    directory = Directory(Settings())

    async def handle_async(group: int, replica: int) -> object:
        return replicas.handle(replica)

    monkeypatch.setattr(directory, "handle_async", handle_async)
    assert (await directory.master(0))[0] == 0
    directory.suspect(0, 0)
    with pytest.raises(directory_module.NoMaster):
        await directory.master(0)
    replicas.answers = {0: (0, 3, "master"), 1: (1, 4, "master"), 2: (1, 4, "follower")}
    assert (await directory.master(0))[0] == 1
    # A suspect elected again in a newer term is trusted again at once.
    directory.suspect(0, 1)
    replicas.answers = {0: (1, 4, "follower"), 1: (1, 4, "master"), 2: (1, 4, "follower")}
    with pytest.raises(directory_module.NoMaster):
        await directory.master(0)
    replicas.answers = {0: (1, 5, "follower"), 1: (1, 5, "master"), 2: (1, 5, "follower")}
    assert (await directory.master(0))[0] == 1


@pytest.mark.anyio
async def test_a_master_is_still_followed_while_no_other_can_be_elected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Of three replicas one follower that still follows the master is enough (the
    other cannot win alone); of five, two are needed."""
    three = _Answers({1: (0, 3, "follower"), 2: (None, 3, "pre-candidate")})
    directory = Directory(Settings(replicas=3))

    async def handle_of(answers: _Answers) -> object:
        async def handle_async(group: int, replica: int) -> object:
            return answers.handle(replica)

        return handle_async

    monkeypatch.setattr(directory, "handle_async", await handle_of(three))
    assert await directory.still_followed(0, 0)
    three.answers[1] = (None, 3, "pre-candidate")
    assert not await directory.still_followed(0, 0)
    three.answers[1] = (2, 4, "follower")  # follows another master
    assert not await directory.still_followed(0, 0)

    five = _Answers({r: (0, 3, "follower") for r in (1, 2)} | {3: (None, 4, "candidate")})
    five.answers[4] = (None, 4, "candidate")
    directory5 = Directory(Settings(replicas=5))
    monkeypatch.setattr(directory5, "handle_async", await handle_of(five))
    assert await directory5.still_followed(0, 0)
    five.answers[2] = (3, 4, "follower")
    assert not await directory5.still_followed(0, 0)
