"""Tests for flowray.query.series, checked against zoneinfo/datetime rather than the module."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.core.invariant import InvariantError
from flowray.query.series import (
    INTERVALS,
    Bucket,
    RangeError,
    bucket_starts,
    buckets,
    check_range,
    dense_series,
    labels,
    parse_time,
    parse_zone,
)

MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000


def ms(text: str, tz: str = "UTC") -> int:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(tz))
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def local(instant_ms: int, tz: str) -> datetime:
    return datetime.fromtimestamp(instant_ms / 1000, ZoneInfo(tz))


def series_labels(start: str, end: str, interval: str, tz: str) -> list[str]:
    zone = parse_zone(tz)
    starts = bucket_starts(parse_time(start, zone), parse_time(end, zone), interval, zone)
    return labels(starts, zone, interval)


# --- UTC -------------------------------------------------------------------------------


def test_utc_minute_hour_day() -> None:
    zone = parse_zone("UTC")
    start, end = ms("2020-03-14T07:20:00+00:00"), ms("2020-03-14T07:25:00+00:00")
    minutes = bucket_starts(start, end, "minute", zone)
    assert minutes.tolist() == list(range(start, end, MINUTE))
    assert labels(minutes, zone, "minute")[0] == "2020-03-14T07:20:00+00:00"
    hours = bucket_starts(ms("2020-03-14T00:00+00:00"), ms("2020-03-15T00:00+00:00"), "hour", zone)
    assert len(hours) == 24 and np.all(np.diff(hours) == HOUR)
    days = bucket_starts(ms("2020-03-01T00:00+00:00"), ms("2020-04-01T00:00+00:00"), "day", zone)
    assert len(days) == 31
    assert labels(days, zone, "day")[-1] == "2020-03-31T00:00:00+00:00"


def test_dense_series_utc_sums_and_zero_buckets() -> None:
    zone = parse_zone("UTC")
    start = ms("2020-03-14T00:00+00:00")
    minute_ms = np.array([start + 5 * MINUTE, start + HOUR, start + 5 * MINUTE], dtype=np.int64)
    counts = np.array([2, 7, 3], dtype=np.int64)
    starts, totals = dense_series(minute_ms, counts, start, start + 3 * HOUR, "hour", zone)
    assert starts.tolist() == [start, start + HOUR, start + 2 * HOUR]
    assert totals.tolist() == [5, 7, 0]


# --- DST in America/New_York ------------------------------------------------------------


def test_new_york_spring_forward_has_23_hours() -> None:
    texts = series_labels("2021-03-14", "2021-03-15", "hour", "America/New_York")
    assert len(texts) == 23
    assert texts[:3] == [
        "2021-03-14T00:00:00-05:00",
        "2021-03-14T01:00:00-05:00",
        "2021-03-14T03:00:00-04:00",
    ]
    assert texts[-1] == "2021-03-14T23:00:00-04:00"


def test_new_york_fall_back_repeats_one_hour() -> None:
    texts = series_labels("2021-11-07", "2021-11-08", "hour", "America/New_York")
    assert len(texts) == 25
    assert texts[1:4] == [
        "2021-11-07T01:00:00-04:00",
        "2021-11-07T01:00:00-05:00",
        "2021-11-07T02:00:00-05:00",
    ]


def test_day_buckets_over_dst_changes_sum_right() -> None:
    tz = "America/New_York"
    zone = parse_zone(tz)
    start, end = parse_time("2021-03-13", zone), parse_time("2021-03-16", zone)
    minute_ms = np.arange(start, end, MINUTE, dtype=np.int64)
    starts, totals = dense_series(minute_ms, np.ones_like(minute_ms), start, end, "day", zone)
    assert totals.tolist() == [1440, 1380, 1440]
    assert [local(s, tz).isoformat() for s in starts.tolist()] == labels(starts, zone, "day")

    start, end = parse_time("2021-11-06", zone), parse_time("2021-11-09", zone)
    minute_ms = np.arange(start, end, MINUTE, dtype=np.int64)
    starts, totals = dense_series(minute_ms, np.ones_like(minute_ms), start, end, "day", zone)
    assert totals.tolist() == [1440, 1500, 1440]


def test_europe_london() -> None:
    texts = series_labels("2021-03-28", "2021-03-29", "hour", "Europe/London")
    assert len(texts) == 23
    assert texts[1:3] == ["2021-03-28T02:00:00+01:00", "2021-03-28T03:00:00+01:00"]
    days = series_labels("2021-10-30", "2021-11-02", "day", "Europe/London")
    assert days == [
        "2021-10-30T00:00:00+01:00",
        "2021-10-31T00:00:00+01:00",
        "2021-11-01T00:00:00+00:00",
    ]


# --- Offsets that are not whole hours ---------------------------------------------------


@pytest.mark.parametrize(("tz", "minute_utc"), [("Asia/Kolkata", 30), ("Asia/Kathmandu", 15)])
def test_fractional_offset_hours_start_off_the_utc_hour(tz: str, minute_utc: int) -> None:
    zone = parse_zone(tz)
    starts = bucket_starts(ms("2020-03-14T00:00+00:00"), ms("2020-03-15T00:00+00:00"), "hour", zone)
    assert len(starts) == 25  # the range is unaligned, so the first bucket starts before it
    assert {datetime.fromtimestamp(s / 1000, UTC).minute for s in starts.tolist()} == {minute_utc}
    assert all(local(s, tz).minute == 0 for s in starts.tolist())
    offset = "+05:30" if tz == "Asia/Kolkata" else "+05:45"
    assert labels(starts, zone, "hour")[0].endswith(offset)


def test_lord_howe_half_hour_shift() -> None:
    tz = "Australia/Lord_Howe"
    # Fall back on 2021-04-04 at 02:00 (+11:00) to 01:30 (+10:30): the 01:00 bucket lasts
    # 90 minutes because no instant has local minute 0 at the repeat.
    texts = series_labels("2021-04-04T00:00", "2021-04-04T04:00", "hour", tz)
    assert texts == [
        "2021-04-04T00:00:00+11:00",
        "2021-04-04T01:00:00+11:00",
        "2021-04-04T02:00:00+10:30",
        "2021-04-04T03:00:00+10:30",
    ]
    zone = parse_zone(tz)
    starts = bucket_starts(
        parse_time("2021-04-04", zone), parse_time("2021-04-05", zone), "hour", zone
    )
    assert len(starts) == 24 and int(np.diff(starts).max()) == 90 * MINUTE
    # Spring forward on 2021-10-03 at 02:00 (+10:30) to 02:30 (+11:00).
    texts = series_labels("2021-10-03T00:00", "2021-10-03T04:00", "hour", tz)
    assert texts == [
        "2021-10-03T00:00:00+10:30",
        "2021-10-03T01:00:00+10:30",
        "2021-10-03T03:00:00+11:00",
    ]


def test_day_starts_where_midnight_does_not_exist() -> None:
    texts = series_labels("2018-11-03", "2018-11-06", "day", "America/Sao_Paulo")
    assert texts == [
        "2018-11-03T00:00:00-03:00",
        "2018-11-04T01:00:00-02:00",
        "2018-11-05T00:00:00-02:00",
    ]
    # Havana springs forward at midnight too (2021-03-14).
    texts = series_labels("2021-03-13", "2021-03-15", "day", "America/Havana")
    assert texts == ["2021-03-13T00:00:00-05:00", "2021-03-14T01:00:00-04:00"]


def test_far_future_follows_zoneinfo_rules() -> None:
    # TZif files list transitions only to 2037; later ones come from the POSIX rule.
    texts = series_labels("2050-03-13", "2050-03-14", "hour", "America/New_York")
    assert len(texts) == 23 and texts[-1].endswith("-04:00")


# --- Range edges ------------------------------------------------------------------------


def test_unaligned_start_gives_partial_first_bucket() -> None:
    zone = parse_zone("UTC")
    start = ms("2020-03-14T07:20:00+00:00")
    minute_ms = np.array([start - 10 * MINUTE, start, start + 50 * MINUTE], dtype=np.int64)
    starts, totals = dense_series(
        minute_ms, np.array([100, 1, 2]), start, start + HOUR, "hour", zone
    )
    assert starts.tolist() == [ms("2020-03-14T07:00+00:00"), ms("2020-03-14T08:00+00:00")]
    assert totals.tolist() == [1, 2]


def test_counts_outside_range_ignored_and_repeats_summed() -> None:
    zone = parse_zone("Europe/Berlin")
    start, end = parse_time("2021-06-01", zone), parse_time("2021-06-02", zone)
    minute_ms = np.array([end, start + MINUTE, start - MINUTE, start + MINUTE, end - MINUTE])
    counts = np.array([1000, 3, 1000, 4, 5])
    starts, totals = dense_series(minute_ms, counts, start, end, "day", zone)
    assert starts.tolist() == [start] and totals.tolist() == [12]
    starts, totals = dense_series(minute_ms, counts, start, end, "minute", zone)
    assert len(starts) == 1440 and totals.sum() == 12 and totals[1] == 7


def test_dense_series_rejects_non_minute_data() -> None:
    zone = parse_zone("UTC")
    with pytest.raises(InvariantError):
        dense_series(np.array([1]), np.array([1]), 0, HOUR, "minute", zone)
    with pytest.raises(InvariantError):
        dense_series(np.array([0, MINUTE]), np.array([1]), 0, HOUR, "minute", zone)


def test_buckets_pairs_starts_with_labels() -> None:
    zone = parse_zone("Asia/Shanghai")
    starts = bucket_starts(ms("2020-03-13T23:00+00:00"), ms("2020-03-14T00:00+00:00"), "hour", zone)
    assert buckets(starts, zone, "hour") == [
        Bucket(ms("2020-03-13T23:00+00:00"), "2020-03-14T07:00:00+08:00")
    ]


# --- Parsing and validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Mars/Olympus", "", "../x", "/etc/passwd", "America/../UTC", "zone.tab", "America"]
)
def test_unknown_zone(name: str) -> None:
    with pytest.raises(RangeError, match="unknown time zone"):
        parse_zone(name)


def test_parse_time_forms() -> None:
    ny = parse_zone("America/New_York")
    assert parse_time("2020-03-14T07:20:39.595Z", ny) == ms("2020-03-14T07:20:39.595+00:00")
    assert parse_time("2020-03-14t07:20:00+08:00", ny) == ms("2020-03-13T23:20:00+00:00")
    assert parse_time("2020-03-14", ny) == ms("2020-03-14T04:00:00+00:00")  # EDT
    assert parse_time("1584170439595", ny) == 1584170439595
    assert parse_time(" 2020-03-14 07:20 ", ny) == ms("2020-03-14T11:20:00+00:00")
    # Ambiguous: the first occurrence (EDT). In the gap: shifted forward (02:30 -> 03:30 EDT).
    assert parse_time("2021-11-07T01:30", ny) == ms("2021-11-07T05:30:00+00:00")
    assert parse_time("2021-03-14T02:30", ny) == ms("2021-03-14T07:30:00+00:00")
    sao_paulo = parse_zone("America/Sao_Paulo")
    assert parse_time("2018-11-04", sao_paulo) == ms("2018-11-04T03:00:00+00:00")


@pytest.mark.parametrize(
    "value", ["", "yesterday", "2020-13-01", "2020-03-14T25:00", "12abc", "x" * 500, "-5", "1e9"]
)
def test_parse_time_garbage(value: str) -> None:
    with pytest.raises(RangeError):
        parse_time(value, parse_zone("UTC"))


def test_parse_time_out_of_range() -> None:
    with pytest.raises(RangeError, match="outside"):
        parse_time("1969-12-31T23:59:59Z", parse_zone("UTC"))
    with pytest.raises(RangeError, match="outside"):
        parse_time("9999999999999999", parse_zone("UTC"))


def test_check_range() -> None:
    check_range(0, DAY, "minute", 1)
    # A month of local days that includes the fall back is 1 h longer than 31 x 24 h.
    check_range(0, 31 * DAY + HOUR, "minute", 31)
    with pytest.raises(RangeError, match="end must be after start"):
        check_range(DAY, DAY, "hour", 10)
    with pytest.raises(RangeError, match="interval must be one of minute, hour, day, week, month"):
        check_range(0, DAY, "year", 10)
    with pytest.raises(
        RangeError, match="range of 32 days exceeds the limit of 31 days for interval 'minute'"
    ):
        check_range(0, 32 * DAY, "minute", 31)
    with pytest.raises(RangeError, match="interval must be one of"):
        bucket_starts(0, DAY, "fortnight", parse_zone("UTC"))


# --- Properties -------------------------------------------------------------------------

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "America/Sao_Paulo",
    "America/Havana",
    "Pacific/Chatham",
    "Antarctica/Troll",
    "Pacific/Apia",
    "America/St_Johns",
]
BASE_MS = ms("2000-01-01T00:00:00+00:00")
SPAN_MINUTES_MAX = 40 * 365 * 1440  # up to 2040, past the end of explicit TZif transitions


def assert_aligned(starts: list[int], tz: str, interval: str) -> None:
    zone = ZoneInfo(tz)
    for before, start in zip([None, *starts], starts, strict=False):
        wall = datetime.fromtimestamp(start / 1000, zone)
        if interval == "minute":
            assert start % MINUTE == 0
        elif interval == "hour":
            assert (wall.minute, wall.second) == (0, 0)
        else:
            just_before = datetime.fromtimestamp((start - 1000) / 1000, zone)
            assert just_before.date() < wall.date(), "a day starts where the date begins"
            if before is not None:
                assert datetime.fromtimestamp(before / 1000, zone).date() < wall.date()


@settings(max_examples=200, deadline=None)
@given(
    tz=st.sampled_from(ZONES),
    interval=st.sampled_from(INTERVALS),
    offset_minutes=st.integers(0, SPAN_MINUTES_MAX),
    start_shift_s=st.integers(0, 3 * 86_400),
    length_s=st.integers(1, 10 * 86_400),
    data=st.lists(st.tuples(st.integers(-3000, 20_000), st.integers(0, 1000)), max_size=60),
)
def test_dense_series_properties(
    tz: str,
    interval: str,
    offset_minutes: int,
    start_shift_s: int,
    length_s: int,
    data: list[tuple[int, int]],
) -> None:
    zone = parse_zone(tz)
    base = BASE_MS + offset_minutes * MINUTE
    start, end = base + start_shift_s * 1000, base + (start_shift_s + length_s) * 1000
    minute_ms = np.array([base + m * MINUTE for m, _ in data], dtype=np.int64)
    counts = np.array([c for _, c in data], dtype=np.int64)
    starts, totals = dense_series(minute_ms, counts, start, end, interval, zone)

    expected = sum(
        c for m, c in zip(minute_ms.tolist(), counts.tolist(), strict=True) if start <= m < end
    )
    assert int(totals.sum()) == expected
    assert np.all(np.diff(starts) > 0)
    assert starts[0] <= start < (starts[1] if len(starts) > 1 else end + 2 * DAY)
    assert starts[-1] < end
    assert_aligned(starts.tolist(), tz, interval)
    if interval == "hour":
        # No hour boundary is missed: at most 90 minutes between starts (Lord Howe).
        assert len(starts) == 1 or int(np.diff(starts).max()) <= 90 * MINUTE
    texts = labels(starts, zone, interval)
    assert texts == [local(s, tz).isoformat() for s in starts.tolist()]


@settings(max_examples=50, deadline=None)
@given(tz=st.sampled_from(ZONES), day=st.integers(0, 40 * 365))
def test_every_local_date_has_one_day_bucket(tz: str, day: int) -> None:
    zone = ZoneInfo(tz)
    start = BASE_MS + day * DAY
    starts = bucket_starts(start, start + 5 * DAY, "day", parse_zone(tz)).tolist()
    seen_dates = {datetime.fromtimestamp(s / 1000, zone).date() for s in starts}
    first = datetime.fromtimestamp(starts[0] / 1000, zone).date()
    last = datetime.fromtimestamp((start + 5 * DAY - 1000) / 1000, zone).date()
    expected = set()
    probe = first
    while probe <= last:
        wall = datetime(probe.year, probe.month, probe.day, tzinfo=zone)
        # A date exists unless a gap swallows it whole (Pacific/Apia 2011-12-30).
        if wall.astimezone(UTC).astimezone(zone).date() >= probe:
            expected.add(probe)
        probe += timedelta(days=1)
    assert seen_dates == {d for d in expected if d >= first}
    assert len(starts) == len(seen_dates)


@pytest.mark.parametrize("tz", ZONES)
def test_hour_and_day_buckets_over_years(tz: str) -> None:
    zone = parse_zone(tz)
    start, end = ms("2010-06-01T00:00+00:00"), ms("2013-06-01T00:00+00:00")
    for interval in ("hour", "day"):
        starts = bucket_starts(start, end, interval, zone)
        assert_aligned(starts.tolist(), tz, interval)
        gap_max = 90 * MINUTE if interval == "hour" else 50 * HOUR
        assert int(np.diff(starts).max()) <= gap_max
        assert labels(starts, zone, interval) == [local(s, tz).isoformat() for s in starts.tolist()]


def test_speed_sanity() -> None:
    zone = parse_zone("America/New_York")
    start = parse_time("2015-01-01", zone)
    for interval, days in (("day", 3653), ("hour", 3 * 365), ("minute", 31)):
        began = time.perf_counter()
        starts = bucket_starts(start, start + days * DAY, interval, zone)
        built = time.perf_counter()
        labels(starts, zone, interval)
        done = time.perf_counter()
        print(
            f"{interval}: {len(starts)} buckets in {(built - began) * 1000:.1f} ms,"
            f" labels in {(done - built) * 1000:.1f} ms"
        )
