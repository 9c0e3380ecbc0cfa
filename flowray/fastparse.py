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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from flowray.invariant import require
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


# A whitespace-only line (bytes.strip's whitespace), searched in b"\n" + body + b"\n".
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*(?=\n)")


def _blank_lines(body: bytes) -> int:
    if not _BLANK_LINE.search(b"\n" + body + b"\n"):
        return 0  # the usual case, found by one scan instead of a list of every line
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
    if not (_all_bytes(date, 10) and _all_bytes(time, 12)):
        return None
    ts = _seed_ms(_fixed_width(date, 10), _fixed_width(time, 12))
    if ts is None:
        return None
    nulls = pa.nulls(raw.num_rows, pa.string())
    table = pa.table([pa.array(ts), site] + [nulls] * len(_STRINGS), schema=_JSON_SCHEMA)
    return _finish(table, limits)


def _all_bytes(column: pa.ChunkedArray, n: int) -> bool:
    lengths = pc.binary_length(column)
    return bool(pc.min(lengths).as_py() == n and pc.max(lengths).as_py() == n)


def _fixed_width(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """The bytes of a string column whose values are all ``width`` bytes, as a matrix."""
    array = column.combine_chunks()
    require(array.null_count == 0, "a fixed-width column with nulls")
    first = np.frombuffer(array.buffers()[1], dtype=np.int32, count=1, offset=4 * array.offset)
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
    start = int(first[0])
    return data[start : start + width * len(array)].reshape(len(array), width)


_DATE_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9]  # yyyy.mm.dd
_TIME_DIGITS = [0, 1, 3, 4, 6, 7, 9, 10, 11]  # HH:MM:SS.fff
_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def _seed_ms(date: np.ndarray, time: np.ndarray) -> np.ndarray | None:
    """Epoch ms of "yyyy.mm.dd" and "HH:MM:SS.fff" byte matrices, or None if any row is
    not exactly that form or not a real date and time (the exact parser says why).

    Digits are read with numpy, and the date becomes days with Howard Hinnant's
    days_from_civil: an order of magnitude faster than strptime and a round trip
    through strftime (34 ms for 10,000 lines on the reference machine).
    """
    d = date.astype(np.int64) - ord("0")
    t = time.astype(np.int64) - ord("0")
    digits_ok = ((d[:, _DATE_DIGITS] >= 0) & (d[:, _DATE_DIGITS] <= 9)).all() and (
        (t[:, _TIME_DIGITS] >= 0) & (t[:, _TIME_DIGITS] <= 9)
    ).all()
    marks_ok = (
        (date[:, 4] == ord(".")).all()
        and (date[:, 7] == ord(".")).all()
        and (time[:, 2] == ord(":")).all()
        and (time[:, 5] == ord(":")).all()
        and (time[:, 8] == ord(".")).all()
    )
    if not (digits_ok and marks_ok):
        return None
    year = d[:, 0] * 1000 + d[:, 1] * 100 + d[:, 2] * 10 + d[:, 3]
    month, day = d[:, 5] * 10 + d[:, 6], d[:, 8] * 10 + d[:, 9]
    hour, minute, second = t[:, 0] * 10 + t[:, 1], t[:, 3] * 10 + t[:, 4], t[:, 6] * 10 + t[:, 7]
    millis = t[:, 9] * 100 + t[:, 10] * 10 + t[:, 11]
    if not ((month >= 1) & (month <= 12)).all():
        return None
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = _MONTH_DAYS[month - 1] + ((month == 2) & leap)
    if not (
        (day >= 1) & (day <= month_days) & (hour <= 23) & (minute <= 59) & (second <= 59)
    ).all():
        return None
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    days = era * 146_097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719_468
    return ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis


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
