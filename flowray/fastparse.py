"""Vectorized fast paths for the ingest parsers, with the exact parsers as fallback.

Most batches are well-formed. These functions parse them with Arrow's C++ readers and
check them with vectorized compute, and answer ``None`` at the first doubt — a type
Arrow would coerce, a bad site, a timestamp out of range, anything unusual — so the
exact parsers in :mod:`flowray.events` run instead and report every bad item with its
position. A fast path never accepts what the exact parser would reject, and gives the
same table for what it accepts (tests/test_fastparse.py checks both, differentially).
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from flowray.router import SiteError, normalize_site

if TYPE_CHECKING:
    from flowray.events import Limits

_STRINGS = ("path", "referrer", "ua", "visitor", "id")
_JSON_SCHEMA = pa.schema(
    [("ts", pa.int64()), ("site", pa.string())] + [(name, pa.string()) for name in _STRINGS]
)
_SEED_COLUMNS = ["date", "time", "site"]
_READ_BLOCK_BYTES = 16 * 1024 * 1024
# Searched in b"\n" + body: a leading alternation (?:^|\n) made re try every position
# (10 ms for a 600 KB body); a literal first character lets it skip to each newline.
_NOT_AN_OBJECT_LINE = re.compile(rb"\n[ \t\r]*[^{\s]")
# Below this size a thread pool's hand-off costs more than it saves.
_THREADS_FROM_BYTES = 4 * 1024 * 1024


def ndjson(body: bytes, limits: Limits) -> pa.Table | None:
    """NDJSON with integer ``ts`` (or none) and string fields: the tracker's usual form."""
    if not body.strip() or b'"ts":"' in body or b'"ts": "' in body or not _utf8(body):
        return None  # empty, RFC 3339 strings or bad bytes: the exact parser handles them
    if _NOT_AN_OBJECT_LINE.search(b"\n" + body):
        # A line that is not an object goes to the exact parser, which names it; Arrow's
        # reader also crashes the process on a leading null (apache/arrow#47409).
        return None
    try:
        table = pjson.read_json(
            io.BytesIO(body),
            read_options=pjson.ReadOptions(
                block_size=_READ_BLOCK_BYTES, use_threads=len(body) > _THREADS_FROM_BYTES
            ),
            parse_options=pjson.ParseOptions(
                explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore"
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != body.count(b"\n") + 1 - _blank_lines(body):
        return None  # a line Arrow skipped or merged: let the exact parser judge
    return _finish(table.select(list(_JSON_SCHEMA.names)), limits)


_ARRAY_SCHEMA = pa.schema(
    [("ts", pa.float64()), ("site", pa.string())] + [(name, pa.string()) for name in _STRINGS]
)
_TS_EXACT_MAX = 2**53  # every epoch millisecond of our range is exact as a float64


def json_array(items: object, limits: Limits) -> pa.Table | None:
    """A decoded JSON array (or single object) of events with numeric ``ts``."""
    rows = [items] if type(items) is dict else items
    if type(rows) is not list or not rows or len(rows) > limits.batch_events_max:
        return None
    try:
        table = pa.Table.from_pylist(rows, schema=_ARRAY_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
        return None
    ts = table.column("ts")
    if ts.null_count < len(ts):
        present = ts.drop_null()
        if not pc.all(pc.equal(present, pc.floor(present))).as_py():
            return None  # fractional (or NaN): the exact parser says why
        if pc.max(pc.abs(present)).as_py() >= _TS_EXACT_MAX:
            return None
    table = table.set_column(0, "ts", pc.cast(ts, pa.int64()))
    return _finish(table, limits)


def _utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _blank_lines(body: bytes) -> int:
    return sum(1 for line in body.split(b"\n") if not line.strip())


def seed(body: bytes, limits: Limits) -> pa.Table | None:
    """Seed-form lines whose time is exactly HH:MM:SS.fff, one space apart."""
    if not body.strip() or b"\r" in body or b"\t" in body or b"  " in body or not _utf8(body):
        return None
    try:
        raw = pcsv.read_csv(
            io.BytesIO(body),
            read_options=pcsv.ReadOptions(
                column_names=_SEED_COLUMNS,
                block_size=_READ_BLOCK_BYTES,
                use_threads=len(body) > _THREADS_FROM_BYTES,
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=" ", quote_char=False, ignore_empty_lines=True
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in _SEED_COLUMNS},
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    date, time, site = raw.column("date"), raw.column("time"), raw.column("site")
    if not (_all_length(date, 10) and _all_length(time, 12)):
        return None
    if not pc.all(pc.match_substring_regex(time, r"^\d\d:\d\d:\d\d\.\d\d\d$")).as_py():
        return None
    if not pc.all(pc.match_substring_regex(date, r"^\d\d\d\d\.\d\d\.\d\d$")).as_py():
        return None
    stamp = pc.binary_join_element_wise(date, pc.utf8_slice_codeunits(time, 0, 8), " ")
    try:
        seconds = pc.strptime(stamp, format="%Y.%m.%d %H:%M:%S", unit="ms")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    # strptime rolls 2020.02.30 over to March: a round trip finds such dates.
    whole = pc.cast(seconds, pa.timestamp("s"))  # %S of a ms timestamp prints a fraction
    if not pc.all(pc.equal(pc.strftime(whole, format="%Y.%m.%d %H:%M:%S"), stamp)).as_py():
        return None
    millis = pc.cast(pc.utf8_slice_codeunits(time, 9, 12), pa.int64())
    ts = pc.add(pc.cast(seconds, pa.int64()), millis)
    nulls = pa.nulls(raw.num_rows, pa.string())
    table = pa.table([ts, site] + [nulls] * len(_STRINGS), schema=_JSON_SCHEMA)
    return _finish(table, limits)


def _all_length(column: pa.ChunkedArray, n: int) -> bool:
    lengths = pc.utf8_length(column)
    return bool(pc.min(lengths).as_py() == n and pc.max(lengths).as_py() == n)


def _finish(table: pa.Table, limits: Limits) -> pa.Table | None:
    """Checks shared by every fast path; None sends the batch to the exact parser."""
    from flowray.events import EVENT_SCHEMA, PATH_CHARS_MAX, TS_MIN_MS, VISITOR_CHARS_MAX

    n = table.num_rows
    if n == 0 or n > limits.batch_events_max:
        return None
    ts = table.column("ts").fill_null(limits.now_ms)
    lo, hi = pc.min(ts).as_py(), pc.max(ts).as_py()
    if lo < TS_MIN_MS or hi > limits.now_ms + limits.future_skew_ms:
        return None
    site = _normalized_sites(table.column("site"))
    if site is None:
        return None
    columns = {"ts": ts, "site": site}
    for name in _STRINGS:
        column = table.column(name)
        limit = VISITOR_CHARS_MAX if name in ("visitor", "id") else PATH_CHARS_MAX
        longest = pc.max(pc.utf8_length(column)).as_py()
        if longest is not None and longest > limit:
            return None
        if name == "id":  # an empty id is no id, as in the exact parser
            column = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
        columns[name] = column
    return pa.table(columns, schema=EVENT_SCHEMA)


def _normalized_sites(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array | None:
    if column.null_count:
        return None
    encoded = column.combine_chunks().dictionary_encode()
    raw = encoded.dictionary.to_pylist()
    try:
        normalized = [normalize_site(s) for s in raw]
    except SiteError:
        return None
    if normalized == raw:
        return column
    return pc.take(pa.array(normalized, pa.string()), encoded.indices)
