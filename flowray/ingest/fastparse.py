"""Vectorized fast paths for the ingest parsers, with the exact parsers as fallback.

Most batches are well-formed. These functions parse them with Arrow's C++ readers and
check them with vectorized compute, and answer ``None`` at the first doubt — a type
Arrow would coerce, a bad site, a timestamp out of range, anything unusual — so the
exact parsers in :mod:`flowray.ingest.events` run instead and report every bad item with its
position. A fast path never accepts what the exact parser would reject, and gives the
same table for what it accepts (tests/test_fastparse.py checks both, differentially).
Both take the fields and limits from :mod:`flowray.ingest.rules`, as the C parser does.
"""

from __future__ import annotations

import io
import re
import types
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pjson

from flowray.core.invariant import require
from flowray.core.router import SiteError, normalize_site
from flowray.ingest.rules import RULES, header_digest
from flowray.ingest.schema import EVENT_SCHEMA, TS_MIN_MS, Limits


def built_from_these_rules(native: types.ModuleType | None) -> types.ModuleType | None:
    """The C parser if it was built from the rules as they are, else None (with a
    warning): one built before they last changed would check the old ones, while the
    other paths follow the new ones, only slower."""
    if native is None or getattr(native, "RULES_DIGEST", None) == header_digest():
        return native
    warnings.warn(
        "flowray.ingest._native was built from other event rules than flowray.ingest.rules "
        "declares, so it is not used: rebuild it (pip install -e .)",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


_native: types.ModuleType | None
try:  # the C parser, built at install where a compiler is found (see setup.py)
    from flowray.ingest import _native
except ImportError:  # pragma: no cover - exercised by the pure path's tests
    _native = None
_native = built_from_these_rules(_native)


# The optional string fields (all but ts and site) and their limits, as the rules say.
_STRINGS = tuple(f.name for f in RULES.fields if f.type == "string" and not f.required)
_CHARS_MAX = {name: RULES.chars_max(name) for name in _STRINGS}
_EMPTY_IS_NULL = frozenset(f.name for f in RULES.fields if f.empty_is_null)
# EVENT_SCHEMA's fields, all nullable: a missing ts or site is found after reading.
_JSON_SCHEMA = pa.schema([(f.name, f.type) for f in EVENT_SCHEMA])
_READ_BLOCK_BYTES = 16 * 1024 * 1024
# Searched in b"\n" + body: a leading alternation (?:^|\n) made re try every position
# (10 ms for a 600 KB body); a literal first character lets it skip to each newline.
_NOT_AN_OBJECT_LINE = re.compile(rb"\n[ \t\r]*[^{\s]")
# Below this size a thread pool's hand-off costs more than it saves.
_THREADS_FROM_BYTES = 4 * 1024 * 1024


def ndjson(body: bytes, limits: Limits) -> pa.Table | None:
    """NDJSON with integer ``ts`` (or none) and string fields: the tracker's usual form."""
    if not body.strip():
        return None  # empty: the exact parser says so
    if _native is not None:
        table = native_ndjson(body, limits)
        if table is not None:
            return table
    if not utf8(body):
        return None  # bad bytes: the exact parser names them
    # RFC 3339 strings are seen in the first line (Arrow refuses any later one: a
    # column that changes from number to string).
    first = body[:4096].split(b"\n", 1)[0]
    if b'"ts":"' in first or b'"ts": "' in first:
        return None  # Arrow's reader does not take them: the exact parser does
    lines, blank, objects = _line_counts(body)
    if not objects and _NOT_AN_OBJECT_LINE.search(b"\n" + body):
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
    if table.num_rows != lines - blank:
        return None  # a line Arrow skipped or merged: let the exact parser judge
    return _finish(table.select(list(_JSON_SCHEMA.names)), limits)


def native_ndjson(body: bytes, limits: Limits) -> pa.Table | None:
    """NDJSON by the C parser (flowray/ingest/_native.c), which answers None at any doubt —
    a nested value, a number for a string, a bad escape, bytes that are not UTF-8 —
    for the Arrow path to judge."""
    return _native_table("ndjson", body, limits)


def json_body(body: bytes, limits: Limits) -> pa.Table | None:
    """A JSON body (an array of events, or one) before it is decoded: by the C parser
    when it is built, else None (then it is decoded and :func:`json_array` or the
    exact parser reads it; so is a body the C parser declines)."""
    if _native is None:
        return None
    return native_json(body, limits)


def native_json(body: bytes, limits: Limits) -> pa.Table | None:
    """A JSON array of events (or one event) by the C parser, None at any doubt: 0.1 ms
    for 1,000 events where decoding them to Python objects and building a table from
    those took 0.8 ms on the reference machine."""
    return _native_table("json", body, limits)


def _native_table(form: str, body: bytes, limits: Limits) -> pa.Table | None:
    if _native is None:
        raise RuntimeError("flowray.ingest._native is not built (no C compiler at install)")
    args = [
        body,
        limits.now_ms,
        TS_MIN_MS,
        limits.now_ms + limits.future_skew_ms,
        RULES.path_chars_max,  # _rules.h says which columns each is for
        RULES.visitor_chars_max,
        limits.batch_events_max,
    ]
    routing = limits.routing
    if routing is not None:
        args += [routing.shard_count, routing.ranks, routing.hour_ms]
    parsed = getattr(_native, form)(*args)
    if parsed is None:
        return None
    n, ts, columns, sites_normal, runs = parsed
    arrays = [pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(ts)])]
    for offsets, data, valid, nulls in columns:
        buffers = [None if valid is None else pa.py_buffer(valid)]
        buffers += [pa.py_buffer(offsets), pa.py_buffer(data)]
        arrays.append(pa.Array.from_buffers(pa.string(), n, buffers, null_count=nulls))
    if not sites_normal:  # upper case, a trailing dot, IDNA...: normalize_site's work
        site = _normalized_sites(pa.chunked_array([arrays[1]]))
        if site is None:
            return None
        arrays[1] = site
    table = pa.table(arrays, schema=EVENT_SCHEMA)
    if routing is not None and runs is not None:
        routing.table, routing.runs = table, runs
    return table


_ARRAY_SCHEMA = _JSON_SCHEMA.set(0, pa.field("ts", pa.float64()))
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


def utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# bytes.strip's whitespace, as a lookup table over byte values.
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True
_BRACE = ord("{")


def _line_counts(body: bytes) -> tuple[int, int, bool]:
    """(lines, blank lines, whether every line but an empty last one begins with "{")
    of ``body``, lines and blank lines as ``body.split(b"\\n")`` and ``strip`` count
    them. The usual body has no line that starts with whitespace, and is judged by
    numpy from its newlines' positions: 0.15 ms for 600 KB on the reference machine,
    against 1.7 ms for a count and two regular expressions."""
    a = np.frombuffer(body, dtype=np.uint8)
    starts = np.flatnonzero(a == 10) + 1  # where each line after the first begins
    lines = len(starts) + 1
    final = int(len(starts) > 0 and int(starts[-1]) == len(a))  # a trailing newline
    starts = starts[: len(starts) - final]
    if len(a) and not _WHITESPACE[a[0]] and not _WHITESPACE[a[starts]].any():
        objects = bool(a[0] == _BRACE and (a[starts] == _BRACE).all())
        return lines, final, objects  # every line (but an empty last one) has a start
    return lines, sum(1 for line in body.split(b"\n") if not line.strip()), False


def seed(body: bytes, limits: Limits) -> pa.Table | None:
    """Seed-form lines whose time is exactly HH:MM:SS.fff, one space apart.

    No CSV reader: the lines become an Arrow binary array over the body itself (its
    offsets are where the lines start), the fixed 24-byte heads and the sites are
    two byte slices of it, and the heads are read as a numpy byte matrix.
    """
    if not body or body.isspace() or b"\r" in body or b"\t" in body or not utf8(body):
        return None
    if not body.endswith(b"\n"):
        body += b"\n"
    raw = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(raw == _NEWLINE)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts
    n = len(lengths)
    offsets = np.append(starts, len(body)).astype(np.int32)
    lines = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(body)])
    if (lengths == 0).any():  # empty lines are skipped, as the exact parser does
        lines, lengths = lines.filter(pa.array(lengths > 0)), lengths[lengths > 0]
    if not len(lengths) or lengths.min() <= _SEED_HEAD:
        return None  # a line too short to hold a site
    head = _byte_matrix(pc.binary_slice(lines, 0, _SEED_HEAD), _SEED_HEAD)
    site = pc.binary_slice(lines, _SEED_HEAD, -1)  # without the newline
    if (np.frombuffer(site.buffers()[2], dtype=np.uint8) == _SPACE).any():
        return None  # a fourth field, or a site with a space: the exact parser says which
    ts = _seed_ms(head)
    if ts is None:
        return None
    nulls = pa.nulls(len(ts), pa.string())
    columns = [pa.array(ts), site.view(pa.string())] + [nulls] * len(_STRINGS)
    return _finish(pa.table(columns, schema=_JSON_SCHEMA), limits)


def _byte_matrix(array: pa.Array, width: int) -> np.ndarray:
    """The bytes of a binary array whose values are all ``width`` bytes, as a matrix."""
    require(array.null_count == 0, "a fixed-width column with nulls")
    first = np.frombuffer(array.buffers()[1], dtype=np.int32, count=1, offset=4 * array.offset)
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
    start = int(first[0])
    return data[start : start + width * len(array)].reshape(len(array), width)


# "yyyy.mm.dd HH:MM:SS.fff " — the head of a seed line, before the site.
_SEED_HEAD = 24
_NEWLINE, _SPACE = ord("\n"), ord(" ")
_DIGITS = np.array([0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22])
_MARKS = np.array([4, 7, 10, 13, 16, 19, 23])
_MARK_BYTES = np.frombuffer(b".. ::. ", dtype=np.uint8)
# Digit weights of year, month, day, hour, minute, second and millisecond: the fields
# are one matrix product of the head's digits (exact in float64: all below 2**53).
_FIELD_WEIGHTS = np.zeros((len(_DIGITS), 7))
for _field, (_first, _count) in enumerate(
    [(0, 4), (4, 2), (6, 2), (8, 2), (10, 2), (12, 2), (14, 3)]
):
    _FIELD_WEIGHTS[_first : _first + _count, _field] = 10.0 ** np.arange(_count - 1, -1, -1)
_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def _days_from_civil(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (Howard Hinnant's algorithm)."""
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    return era * 146_097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719_468  # type: ignore[no-any-return]


# Per year 0..9999 (all a 4-digit year can be): leap or not, and the day number of its
# January 1st; per (leap, month): the month's length and the days before it. Tables
# turn the date arithmetic into three lookups per line.
_YEARS = np.arange(10_000, dtype=np.int64)
_LEAP = (_YEARS % 4 == 0) & ((_YEARS % 100 != 0) | (_YEARS % 400 == 0))
_YEAR_DAYS = _days_from_civil(_YEARS, np.ones_like(_YEARS), np.ones_like(_YEARS))
_MONTH_LEN = np.concatenate([_MONTH_DAYS, _MONTH_DAYS + (np.arange(12) == 1)])
_MONTH_START = np.concatenate(
    [np.cumsum(_MONTH_LEN[:12]) - _MONTH_LEN[:12], np.cumsum(_MONTH_LEN[12:]) - _MONTH_LEN[12:]]
)


def _seed_ms(head: np.ndarray) -> np.ndarray | None:
    """Epoch ms of "yyyy.mm.dd HH:MM:SS.fff " heads (an n x 24 byte matrix), or None if
    any row is not exactly that form or not a real date and time (the exact parser
    says why). An order of magnitude faster than strptime and a round trip through
    strftime (34 ms for 10,000 lines on the reference machine); checked against
    ``datetime`` in tests/test_fastparse.py.
    """
    digits = head[:, _DIGITS] - np.uint8(ord("0"))  # wraps below "0": > 9 as well
    if not ((digits <= 9).all() and (head[:, _MARKS] == _MARK_BYTES).all()):
        return None
    fields = (digits.astype(np.float64) @ _FIELD_WEIGHTS).astype(np.int64)
    year, month, day, hour, minute, second, millis = fields.T
    if not ((month >= 1) & (month <= 12)).all():
        return None
    month_index = _LEAP[year] * 12 + month - 1
    if not (
        (day >= 1)
        & (day <= _MONTH_LEN[month_index])
        & (hour <= 23)
        & (minute <= 59)
        & (second <= 59)
    ).all():
        return None
    days = _YEAR_DAYS[year] + _MONTH_START[month_index] + day - 1
    return days * 86_400_000 + hour * 3_600_000 + minute * 60_000 + second * 1000 + millis  # type: ignore[no-any-return]


def _finish(table: pa.Table, limits: Limits) -> pa.Table | None:
    """Checks shared by every fast path; None sends the batch to the exact parser."""
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
        longest = pc.max(pc.utf8_length(column)).as_py()
        if longest is not None and longest > _CHARS_MAX[name]:
            return None
        if name in _EMPTY_IS_NULL:  # an empty id is no id, as in the exact parser
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
