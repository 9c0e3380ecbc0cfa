# Types of the C parser in _native.c.
_Column = tuple[bytes, bytes, bytes | None, int]

def ndjson(
    body: bytes,
    now_ms: int,
    ts_lo: int,
    ts_hi: int,
    path_chars_max: int,
    visitor_chars_max: int,
    events_max: int,
) -> tuple[int, bytes, tuple[_Column, ...], bool] | None: ...
def json(
    body: bytes,
    now_ms: int,
    ts_lo: int,
    ts_hi: int,
    path_chars_max: int,
    visitor_chars_max: int,
    events_max: int,
) -> tuple[int, bytes, tuple[_Column, ...], bool] | None: ...
