# Types of the C parser in _native.c: two forms, one signature.
from typing import Protocol

_Column = tuple[bytes, bytes, bytes | None, int]

# The digest of the rules (_rules.h) it was built with: flowray.ingest.rules.header_digest().
RULES_DIGEST: str

class _Parse(Protocol):
    def __call__(
        self,
        body: bytes,
        now_ms: int,
        ts_lo: int,
        ts_hi: int,
        path_chars_max: int,
        visitor_chars_max: int,
        events_max: int,
        shard_count: int = 0,
        ranks: bytes | None = None,
        hour_ms: int = 0,
        /,
    ) -> (
        tuple[int, bytes, tuple[_Column, ...], bool, list[tuple[int, int, int, int]] | None] | None
    ): ...

ndjson: _Parse
json: _Parse

def group(
    offsets: bytes | memoryview,
    data: bytes | memoryview,
    ts: bytes | memoryview,
    n: int,
    shard_count: int,
    ranks: bytes | memoryview,
    hour_ms: int,
    /,
) -> list[bytes] | tuple[bytes | None, list[tuple[int, int, int, int]]]: ...
def learn(shard_count: int, sites: list[bytes], shards: list[int], capacity: int, /) -> int: ...

class _Seen: ...

def seen_new() -> _Seen: ...
def first_seen(
    seen: _Seen,
    n: int,
    site_offsets: bytes | memoryview,
    site_data: bytes | memoryview,
    site_at: int,
    id_offsets: bytes | memoryview,
    id_data: bytes | memoryview,
    id_valid: bytes | memoryview | None,
    id_at: int,
    /,
) -> bytes: ...
def seen_size(seen: _Seen, /) -> tuple[int, int]: ...
