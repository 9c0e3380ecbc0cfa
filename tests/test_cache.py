"""One contract suite for every query cache, the real Redis included, plus failure modes.

A cache is an optimization, never a dependency: a Redis that is down or silent must turn
into a miss quickly, and ``make_cache`` must fall back to the in-process cache.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from flowray.query.cache import Cache, MemoryCache, RedisCache, make_cache, redis_answers
from tests.ports import free_port

CONTRACT_TIMEOUT_S = 0.5
DEAD_CALL_S_MAX = 0.5
MIB = 1024 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def dead_url() -> str:
    """A Redis URL at a loopback port where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A Redis URL whose server accepts connections but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


async def new_cache(kind: str, request: pytest.FixtureRequest, unique: str) -> Cache:
    if kind == "memory":
        return MemoryCache()
    url = request.getfixturevalue("real_redis_url")
    return RedisCache(url, timeout_s=CONTRACT_TIMEOUT_S, prefix=f"flowray-test-{unique}:")


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Cache]:
    made = await new_cache(str(request.param), request, unique)
    yield made
    await made.close()


# --------------------------------------------------------------------------- the contract


@pytest.mark.anyio
async def test_miss_is_none(cache: Cache) -> None:
    assert await cache.get("never-set") is None
    assert cache.name in ("memory", "redis")


@pytest.mark.anyio
async def test_round_trip_of_bytes(cache: Cache) -> None:
    value = bytes(range(256)) + b'{"points": []}\x00\r\n'
    await cache.set("k", value, 60)
    got = await cache.get("k")
    assert got == value
    assert isinstance(got, bytes)
    assert await cache.get("k2") is None


@pytest.mark.anyio
async def test_keys_are_exact(cache: Cache) -> None:
    await cache.set("q1:1:a.example", b"one", 60)
    await cache.set("q1:1:a.example:", b"two", 60)
    await cache.set("q1:2:a.example", b"three", 60)
    assert await cache.get("q1:1:a.example") == b"one"
    assert await cache.get("q1:1:a.example:") == b"two"
    assert await cache.get("q1:2:a.example") == b"three"
    assert await cache.get("q1:1:A.example") is None


@pytest.mark.anyio
async def test_overwrite(cache: Cache) -> None:
    await cache.set("k", b"old answer", 60)
    await cache.set("k", b"new", 60)
    assert await cache.get("k") == b"new"


@pytest.mark.anyio
async def test_empty_value_is_a_hit(cache: Cache) -> None:
    await cache.set("k", b"", 60)
    assert await cache.get("k") == b""


@pytest.mark.anyio
async def test_large_value(cache: Cache) -> None:
    value = os.urandom(MIB)
    await cache.set("big", value, 60)
    assert await cache.get("big") == value


@pytest.mark.anyio
@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "redis",
    ],
)
async def test_entry_expires_after_its_ttl(
    kind: str, request: pytest.FixtureRequest, unique: str
) -> None:
    made = await new_cache(kind, request, unique)
    try:
        await made.set("short", b"v", 1)
        await made.set("long", b"v", 60)
        assert await made.get("short") == b"v"
        await anyio.sleep(1.2)
        assert await made.get("long") == b"v"
        assert await made.get("short") is None
    finally:
        await made.close()


# --------------------------------------------------------------------------- per implementation


@pytest.mark.anyio
async def test_memory_cache_is_bounded_lru() -> None:
    cache = MemoryCache(entries_max=2)
    await cache.set("a", b"1", 60)
    await cache.set("b", b"2", 60)
    assert await cache.get("a") == b"1"  # "a" is now the most recently used
    await cache.set("c", b"3", 60)
    assert await cache.get("b") is None
    assert await cache.get("a") == b"1"
    assert await cache.get("c") == b"3"


@pytest.mark.anyio
async def test_redis_prefixes_isolate_caches(real_redis_url: str, unique: str) -> None:
    redis_url = real_redis_url
    one = RedisCache(redis_url, CONTRACT_TIMEOUT_S, prefix=f"flowray-test-{unique}-1:")
    two = RedisCache(redis_url, CONTRACT_TIMEOUT_S, prefix=f"flowray-test-{unique}-2:")
    try:
        await one.set("k", b"one", 60)
        assert await two.get("k") is None
        await two.set("k", b"two", 60)
        assert await one.get("k") == b"one"
        assert one.errors == two.errors == 0
    finally:
        await one.close()
        await two.close()


@pytest.mark.anyio
@pytest.mark.parametrize("which", ["dead", "silent"])
async def test_unreachable_redis_is_a_quick_miss(
    which: str, request: pytest.FixtureRequest, unique: str
) -> None:
    url = request.getfixturevalue(f"{which}_url")
    cache = RedisCache(url, timeout_s=0.05, prefix=f"flowray-test-{unique}:")
    try:
        for _ in range(3):
            started = time.perf_counter()
            assert await cache.get("k") is None
            assert time.perf_counter() - started < DEAD_CALL_S_MAX
            started = time.perf_counter()
            await cache.set("k", b"v", 60)  # must not raise
            assert time.perf_counter() - started < DEAD_CALL_S_MAX
        assert cache.errors == 6
    finally:
        await cache.close()


# --------------------------------------------------------------------------- choosing a cache


def test_redis_answers(real_redis_url: str, dead_url: str, silent_url: str) -> None:
    assert redis_answers(real_redis_url) is True
    for url in (dead_url, silent_url, "", "not a url"):
        started = time.perf_counter()
        assert redis_answers(url, timeout_s=0.2) is False, url
        assert time.perf_counter() - started < 1.0, url


@pytest.mark.anyio
async def test_make_cache_picks_redis_when_it_answers(real_redis_url: str, unique: str) -> None:
    cache = make_cache(real_redis_url, 0.5, 60)
    try:
        assert isinstance(cache, RedisCache)
        assert cache.name == "redis"
        key = f"flowray-test-{unique}"
        await cache.set(key, b"v", 5)
        assert await cache.get(key) == b"v"
    finally:
        await cache.close()


@pytest.mark.anyio
@pytest.mark.parametrize("which", ["dead", "empty"])
async def test_make_cache_falls_back_to_memory(which: str, dead_url: str) -> None:
    url = dead_url if which == "dead" else ""
    started = time.perf_counter()
    cache = make_cache(url, 0.05, 60)
    assert time.perf_counter() - started < 1.0
    assert isinstance(cache, MemoryCache)
    assert cache.name == "memory"
    await cache.set("k", b"v", 60)
    assert await cache.get("k") == b"v"
    await cache.close()
