"""The query cache: Redis when it answers, an in-process cache otherwise.

Both sit behind one small Protocol so the app and the contract tests treat them alike.
A cache is an optimization, never a dependency: a Redis that is down or slow turns
into a miss within ``timeout_s``, and the query is answered from the warehouse.
"""

from __future__ import annotations

import logging
from typing import Protocol

import cachetools
import redis
import redis.asyncio as aioredis

log = logging.getLogger("flowray.cache")
MEMORY_ENTRIES_MAX = 10_000


class Cache(Protocol):
    name: str

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """A bounded LRU with a time to live; per process, so per Serve replica."""

    name = "memory"

    def __init__(self, entries_max: int = MEMORY_ENTRIES_MAX, ttl_s: int = 3600) -> None:
        # Each entry carries its own time to live, as a Redis key does.
        self._entries: cachetools.TLRUCache[str, tuple[float, bytes]] = cachetools.TLRUCache(
            entries_max, ttu=lambda _key, value, now: now + value[0]
        )

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._entries[key] = (float(ttl_s), value)

    async def close(self) -> None:
        self._entries.clear()


class RedisCache:
    """Redis with short timeouts; every error is a miss, counted in ``errors``."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float = 0.05, prefix: str = "flowray:") -> None:
        self.prefix = prefix
        self.errors = 0
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._client.get(self.prefix + key)
            return value if isinstance(value, bytes) else None
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        try:
            await self._client.set(self.prefix + key, value, ex=ttl_s)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if self.errors in (1, 10, 100, 1000) or self.errors % 10_000 == 0:
            log.warning("redis cache error #%d: %s", self.errors, exc)

    async def close(self) -> None:
        await self._client.aclose()


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url``."""
    if not url:
        return False
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def make_cache(url: str, timeout_s: float, ttl_s: int, prefix: str = "flowray:") -> Cache:
    """Redis at ``url`` when it answers now, else the in-process cache."""
    if redis_answers(url):
        return RedisCache(url, timeout_s, prefix)
    return MemoryCache(ttl_s=ttl_s)
