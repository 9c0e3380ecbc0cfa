"""Dense traffic series in any IANA time zone.

The warehouse stores sparse per-minute counts in UTC; the query API answers with a dense
series of minute, hour or day buckets aligned to a zone's wall clock. This module is the
pure core of that answer: no I/O, no clock, only numpy and :mod:`zoneinfo`.

Bucket rules (what "aligned to the wall clock" means where the clock jumps):

- minute buckets are UTC minutes;
- hour buckets start at every instant whose local wall time has minute 0 and second 0.
  A repeated hour (fall back) therefore gives two buckets with different offsets, a skipped
  hour (spring forward) gives none, and a 30-minute shift (Australia/Lord_Howe) gives one
  90-minute bucket rather than a bucket that starts at minute 30;
- day buckets start at the first instant of each local date: local midnight, or the end of
  the gap when midnight does not exist (America/Sao_Paulo 2018-11-04 starts at 01:00).
  When a zone falls back across midnight, the repeated late hour of the previous date
  belongs to the bucket of the new date, so each date has exactly one bucket;
- week buckets are the day buckets of Mondays (ISO weeks), month buckets those of each
  month's first date.

Offsets come from :mod:`zoneinfo` itself, not from pyarrow: pyarrow ignores the POSIX rule
that TZif files use after their last listed transition (2037 for most zones), so its
offsets for later years disagree with the standard library.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from flowray.core.invariant import InvariantError, require
from flowray.core.units import DAY_MS, HOUR_MS, MINUTE_MS

INTERVALS = ("minute", "hour", "day", "week", "month")


# Offsets are found by sampling the zone this often and bisecting between samples that
# differ. That is exact as long as no zone changes its offset and back within one step;
# in tzdata 2024-2025 the shortest such excursion is about 4 days (Africa/Freetown, 1939).
_SAMPLE_STEP_S = 86_400
# Far enough back that the bucket containing the range start is always found, even across
# a skipped date (Pacific/Apia 2011-12-30): for a month bucket, a month and those days.
_MARGIN_MS = 3 * DAY_MS
_MARGIN_MS_OF = {"hour": _MARGIN_MS, "day": _MARGIN_MS, "week": 10 * DAY_MS, "month": 34 * DAY_MS}
# A range of N local days is up to 2 h longer than N x 24 h across a DST change
# (Antarctica/Troll shifts by 2 h), and such a range must still fit a limit of N days.
_RANGE_SLACK_MS = 2 * HOUR_MS

# The product serves web traffic: anything outside these years is a typo, and bounding
# them keeps every datetime conversion (and the zone sampling) within range.
TIME_MIN_MS = 0  # 1970-01-01T00:00:00Z
TIME_MAX_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]{1,40}(?:/[A-Za-z0-9_+\-]{1,40}){0,3}")
_EPOCH_MS_TEXT = re.compile(r"[0-9]{1,16}")
_TEXT_CHARS_MAX = 64


class RangeError(ValueError):
    """A bad zone, time, interval or range in a query; the API answers it with a 4xx."""


@dataclass(frozen=True)
class Bucket:
    start_ms: int
    label: str


def parse_zone(tz: str) -> ZoneInfo:
    """Resolve an IANA zone name, refusing anything that is not a plain zone key.

    ``ZoneInfo`` reads files named by its key, so names are checked against a strict
    pattern first: no dots (hence no ``..``), no leading slash, no odd characters.
    """
    if not isinstance(tz, str) or not _ZONE_NAME.fullmatch(tz):
        raise RangeError(f"unknown time zone {_shorten(tz)!r}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as error:
        raise RangeError(f"unknown time zone {tz!r}") from error


def parse_time(value: str, zone: ZoneInfo) -> int:
    """Read a query time as UTC epoch milliseconds.

    Accepts RFC 3339 / ISO-8601 (an offset or ``Z`` wins over ``zone``), a bare date
    (midnight in ``zone``) and epoch milliseconds as a string of digits. A wall time
    without an offset is read in ``zone`` with ``fold=0``: an ambiguous time is its first
    occurrence, and a time inside a DST gap is shifted forward by the gap (02:30 on a
    spring-forward day in New York is 03:30 EDT), as :mod:`zoneinfo` normalizes it.
    Fractions below a millisecond are truncated toward the past.
    """
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > _TEXT_CHARS_MAX:
        raise RangeError(f"invalid time {_shorten(value)!r}")
    if _EPOCH_MS_TEXT.fullmatch(text):
        return _bounded(int(text), text)
    try:
        # RFC 3339 allows a lowercase "t" and "z"; no other letter is valid here.
        moment = datetime.fromisoformat(text.upper())
    except ValueError as error:
        raise RangeError(
            f"invalid time {text!r}: expected RFC 3339 / ISO-8601 or epoch milliseconds"
        ) from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone, fold=0)
    try:
        epoch_ms = (moment - _EPOCH) // timedelta(milliseconds=1)
    except OverflowError as error:
        raise RangeError(f"invalid time {text!r}: out of range") from error
    return _bounded(epoch_ms, text)


def check_range(start_ms: int, end_ms: int, interval: str, days_max: int) -> None:
    """Refuse a query before any work is done, so a huge range cannot cost a huge series."""
    require(days_max > 0, f"days_max must be positive, got {days_max}")
    _check_interval(interval)
    if end_ms <= start_ms:
        raise RangeError("end must be after start")
    span_ms = end_ms - start_ms
    if span_ms > days_max * DAY_MS + _RANGE_SLACK_MS:
        days = math.ceil(span_ms / DAY_MS)
        raise RangeError(
            f"range of {days} days exceeds the limit of {days_max} days for interval {interval!r}"
        )


def bucket_starts(start_ms: int, end_ms: int, interval: str, zone: ZoneInfo) -> np.ndarray:
    """UTC epoch ms of every bucket overlapping ``[start_ms, end_ms)``, ascending.

    The first bucket is the one containing ``start_ms``, so it may start earlier. Hour and
    day buckets are built per span of constant UTC offset, which keeps the work
    proportional to the number of buckets plus a few calls into :mod:`zoneinfo` per day.
    """
    _check_interval(interval)
    if end_ms <= start_ms:
        return np.empty(0, dtype=np.int64)
    if interval == "minute":
        first_ms = start_ms - start_ms % MINUTE_MS
        return np.arange(first_ms, end_ms, MINUTE_MS, dtype=np.int64)
    lo_ms = start_ms - _MARGIN_MS_OF[interval]
    bounds_ms, offsets_ms = _offset_segments(zone, lo_ms, end_ms)
    if interval == "hour":
        candidates = _hour_starts(lo_ms, end_ms, bounds_ms, offsets_ms)
    else:
        candidates = _day_starts(lo_ms, end_ms, bounds_ms, offsets_ms)
        if interval != "day":
            candidates = _calendar_starts(candidates, bounds_ms, offsets_ms, interval)
    first = int(np.searchsorted(candidates, start_ms, side="right")) - 1
    require(first >= 0, f"no {interval} bucket starts before {start_ms} in {zone.key}")
    stop = int(np.searchsorted(candidates, end_ms, side="left"))
    return candidates[first:stop]


def dense_series(
    minute_ms: np.ndarray,
    counts: np.ndarray,
    start_ms: int,
    end_ms: int,
    interval: str,
    zone: ZoneInfo,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum sparse minute counts into every bucket of the range, zero buckets included.

    Only minutes in ``[start_ms, end_ms)`` count, so when ``start_ms`` is not aligned the
    first bucket is partial (it holds the minutes from ``start_ms`` on), and likewise the
    last one when ``end_ms`` is not aligned. Repeated minutes are summed. Sums are done
    in int64 (``np.add.at``), not in the float64 that ``np.bincount`` weights would use.
    """
    minutes = np.asarray(minute_ms, dtype=np.int64)
    values = np.asarray(counts, dtype=np.int64)
    require(minutes.ndim == 1, "minute_ms must be one-dimensional")
    require(minutes.shape == values.shape, "minute_ms and counts differ in length")
    require(bool(np.all(minutes % MINUTE_MS == 0)), "minute_ms holds a non-minute instant")
    starts = bucket_starts(start_ms, end_ms, interval, zone)
    totals = np.zeros(len(starts), dtype=np.int64)
    inside = (minutes >= start_ms) & (minutes < end_ms)
    slots = np.searchsorted(starts, minutes[inside], side="right") - 1
    np.add.at(totals, slots, values[inside])
    return starts, totals


def labels(bucket_starts_ms: np.ndarray, zone: ZoneInfo, interval: str) -> list[str]:
    """ISO-8601 labels with the zone's offset, the same shape for every interval.

    One shape (seconds always included, ``+00:00`` rather than ``Z``) lets clients parse
    every answer alike; it is what ``datetime.isoformat()`` gives for the same instant.
    """
    _check_interval(interval)
    starts = np.asarray(bucket_starts_ms, dtype=np.int64)
    if len(starts) == 0:
        return []
    offsets_ms = _offsets_at(zone, starts)
    local = (starts + offsets_ms).astype("datetime64[ms]").astype("datetime64[s]")
    walls = np.datetime_as_string(local, unit="s").tolist()
    suffixes = {int(o): _offset_text(int(o)) for o in np.unique(offsets_ms)}
    return [wall + suffixes[o] for wall, o in zip(walls, offsets_ms.tolist(), strict=True)]


def buckets(bucket_starts_ms: np.ndarray, zone: ZoneInfo, interval: str) -> list[Bucket]:
    """Pair bucket starts with their labels for callers that want objects, not arrays."""
    texts = labels(bucket_starts_ms, zone, interval)
    return [Bucket(int(s), t) for s, t in zip(bucket_starts_ms.tolist(), texts, strict=True)]


def _hour_starts(
    lo_ms: int, hi_ms: int, bounds_ms: np.ndarray, offsets_ms: np.ndarray
) -> np.ndarray:
    """Instants in ``[lo_ms, hi_ms)`` whose local wall time is on the hour."""
    edges = [lo_ms, *bounds_ms.tolist(), hi_ms]
    parts = []
    for begin, end, offset in zip(edges[:-1], edges[1:], offsets_ms.tolist(), strict=True):
        first = begin + (-(begin + offset)) % HOUR_MS
        parts.append(np.arange(first, end, HOUR_MS, dtype=np.int64))
    return np.concatenate(parts)


def _day_starts(
    lo_ms: int, hi_ms: int, bounds_ms: np.ndarray, offsets_ms: np.ndarray
) -> np.ndarray:
    """First instant of each local date that begins in ``(lo_ms, hi_ms)``.

    A date begins either at a local midnight or at an offset change that jumps over
    midnight, so those are the only candidates; the earliest candidate of each date wins.
    Dates up to the one containing ``lo_ms`` began before the window and are dropped.
    """
    edges = [lo_ms, *bounds_ms.tolist(), hi_ms]
    parts = [bounds_ms]
    for begin, end, offset in zip(edges[:-1], edges[1:], offsets_ms.tolist(), strict=True):
        first = begin + (-(begin + offset)) % DAY_MS
        parts.append(np.arange(first, end, DAY_MS, dtype=np.int64))
    candidates = np.sort(np.concatenate(parts))
    slots = np.searchsorted(bounds_ms, candidates, side="right")
    dates = (candidates + offsets_ms[slots]) // DAY_MS
    keep = dates > (lo_ms + int(offsets_ms[0])) // DAY_MS
    _, first_index = np.unique(dates[keep], return_index=True)
    return np.sort(candidates[keep][first_index])


def _calendar_starts(
    day_starts: np.ndarray, bounds_ms: np.ndarray, offsets_ms: np.ndarray, interval: str
) -> np.ndarray:
    """The day starts that begin an ISO week (a Monday) or a month (its first date)."""
    slots = np.searchsorted(bounds_ms, day_starts, side="right")
    dates = ((day_starts + offsets_ms[slots]) // DAY_MS).astype("datetime64[D]")
    if interval == "week":
        keep = (dates.astype(np.int64) + 3) % 7 == 0  # 1970-01-01 was a Thursday
    else:
        keep = dates == dates.astype("datetime64[M]").astype("datetime64[D]")
    return day_starts[keep]


def _offsets_at(zone: ZoneInfo, instants_ms: np.ndarray) -> np.ndarray:
    """UTC offset (ms) in force at each instant."""
    lo_ms, hi_ms = int(instants_ms.min()), int(instants_ms.max())
    bounds_ms, offsets_ms = _offset_segments(zone, lo_ms, hi_ms + 1)
    return offsets_ms[np.searchsorted(bounds_ms, instants_ms, side="right")]


def _offset_segments(zone: ZoneInfo, lo_ms: int, hi_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """The zone's offset as a step function over ``[lo_ms, hi_ms)``.

    Returns ``bounds_ms`` (offset changes, ascending, in ``(lo_ms, hi_ms)``) and
    ``offsets_ms`` with one more entry: ``offsets_ms[i]`` holds from ``bounds_ms[i - 1]``
    (or ``lo_ms``) up to ``bounds_ms[i]`` (or ``hi_ms``). ``zoneinfo`` has no public
    transition list, so changes are found by sampling and bisecting to the second (tzdata
    offsets and transitions are whole seconds).
    """
    lo_s, hi_s = lo_ms // 1000, -(-hi_ms // 1000)
    samples = [*range(lo_s, hi_s, _SAMPLE_STEP_S), hi_s]
    offsets = [_offset_s(zone, t) for t in samples]
    bounds: list[int] = []
    values = [offsets[0]]
    for a, b, offset_a, offset_b in zip(samples, samples[1:], offsets, offsets[1:], strict=False):
        while offset_a != offset_b:
            a = _first_change_s(zone, a, b, offset_a)
            offset_a = _offset_s(zone, a)
            bounds.append(a)
            values.append(offset_a)
    # Sampling works in whole seconds, so drop a change that falls after hi_ms itself.
    inside = sum(1 for bound in bounds if bound * 1000 < hi_ms)
    bounds_ms = np.array(bounds[:inside], dtype=np.int64) * 1000
    return bounds_ms, np.array(values[: inside + 1], dtype=np.int64) * 1000


def _first_change_s(zone: ZoneInfo, a: int, b: int, offset_a: int) -> int:
    """Smallest second in ``(a, b]`` whose offset differs from ``offset_a``."""
    while b - a > 1:
        middle = (a + b) // 2
        if _offset_s(zone, middle) == offset_a:
            a = middle
        else:
            b = middle
    return b


def _offset_s(zone: ZoneInfo, instant_s: int) -> int:
    offset = datetime.fromtimestamp(instant_s, zone).utcoffset()
    if offset is None:  # ZoneInfo always has one; this narrows the type for mypy
        raise InvariantError(f"zone {zone.key} has no offset at {instant_s}")
    return offset // timedelta(seconds=1)


def _offset_text(offset_ms: int) -> str:
    sign = "-" if offset_ms < 0 else "+"
    minutes, seconds = divmod(abs(offset_ms) // 1000, 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{sign}{hours:02d}:{minutes:02d}"
    return f"{text}:{seconds:02d}" if seconds else text


def _check_interval(interval: str) -> None:
    if interval not in INTERVALS:
        raise RangeError(f"interval must be one of {', '.join(INTERVALS)}")


def _bounded(epoch_ms: int, text: str) -> int:
    if not TIME_MIN_MS <= epoch_ms < TIME_MAX_MS:
        raise RangeError(f"time {text!r} is outside 1970-01-01 .. 2200-01-01")
    return epoch_ms


def _shorten(value: object) -> str:
    text = str(value)
    return text if len(text) <= _TEXT_CHARS_MAX else text[:_TEXT_CHARS_MAX] + "..."
