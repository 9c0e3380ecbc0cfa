"""Tests for flowray.storage.blocks: block placement and the sealing rule, driven by numbers."""

from __future__ import annotations

import pytest

from flowray.storage.blocks import HOUR_MS, BlockTable, SealPolicy
from flowray.storage.replica_log import BlockInfo, BlockKey
from flowray.storage.segment import CONTROL_SHARD

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR = 438_000
T0 = HOUR * HOUR_MS  # the first millisecond of HOUR
POLICY = SealPolicy(
    grace_ms=5 * MINUTE_MS, idle_ms=30 * SECOND_MS, open_max_ms=10 * MINUTE_MS, bytes_max=1000
)
CLOSED = (HOUR + 1) * HOUR_MS + POLICY.grace_ms  # first moment HOUR and its grace are over


def table() -> BlockTable:
    return BlockTable(POLICY)


# --------------------------------------------------------------------------- place


def test_place_opens_part_0_and_keeps_it() -> None:
    t = table()
    assert t.place(1, HOUR, 10, T0) == 0
    assert t.place(1, HOUR, 20, T0 + 5) == 0
    block = t.open[(1, HOUR)]
    assert block.key == (1, HOUR, 0)
    assert block.bytes == 30
    assert block.first_append_ms == T0
    assert block.last_append_ms == T0 + 5


def test_place_keeps_shards_and_hours_apart() -> None:
    t = table()
    t.place(1, HOUR, 10, T0)
    t.place(2, HOUR, 20, T0)
    t.place(1, HOUR + 1, 30, T0)
    assert {k: b.bytes for k, b in t.open.items()} == {
        (1, HOUR): 10,
        (2, HOUR): 20,
        (1, HOUR + 1): 30,
    }


def test_sealed_moves_the_hour_to_the_next_part() -> None:
    t = table()
    t.place(1, HOUR, 10, T0)
    t.sealed((1, HOUR, 0))
    assert (1, HOUR) not in t.open
    assert t.place(1, HOUR, 5, T0 + 1) == 1
    assert t.open[(1, HOUR)].bytes == 5
    assert t.open[(1, HOUR)].first_append_ms == T0 + 1
    t.sealed((1, HOUR, 1))
    assert t.place(1, HOUR, 5, T0 + 2) == 2


def test_sealed_of_another_part_changes_nothing() -> None:
    t = table()
    t.place(1, HOUR, 10, T0)
    t.sealed((1, HOUR, 3))  # not the open part
    t.sealed((2, HOUR, 0))  # not open at all
    assert t.place(1, HOUR, 1, T0) == 0
    assert t.open[(1, HOUR)].bytes == 11


# --------------------------------------------------------------------------- due


def test_due_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError):
        table().due(T0, "sometimes")


def test_an_open_hour_is_not_due_however_old_or_idle() -> None:
    t = table()
    t.place(1, HOUR, 10, T0)
    now = (HOUR + 1) * HOUR_MS - 1  # still inside the hour, long open and idle
    assert t.due(now, "due") == []
    assert t.due(now, "closed") == []
    assert t.due(now, "all") == [(1, HOUR, 0)]


def test_grace_period_holds_back_a_closed_hour() -> None:
    t = table()
    t.place(1, HOUR, 10, T0)
    assert t.due(CLOSED - 1, "due") == []
    assert t.due(CLOSED - 1, "closed") == []
    assert t.due(CLOSED, "due") == [(1, HOUR, 0)]
    assert t.due(CLOSED, "closed") == [(1, HOUR, 0)]


def test_a_closed_hour_with_stragglers_waits_until_idle() -> None:
    t = table()
    t.place(1, HOUR, 10, CLOSED - MINUTE_MS)  # first append a minute before the grace ends
    t.place(1, HOUR, 10, CLOSED - 1)  # a straggler just before
    assert t.due(CLOSED, "due") == []
    assert t.due(CLOSED, "closed") == [(1, HOUR, 0)]
    assert t.due(CLOSED - 1 + POLICY.idle_ms - 1, "due") == []
    assert t.due(CLOSED - 1 + POLICY.idle_ms, "due") == [(1, HOUR, 0)]


def test_a_closed_hour_that_never_goes_idle_is_sealed_at_open_max() -> None:
    t = table()
    first = CLOSED - MINUTE_MS
    t.place(1, HOUR, 1, first)
    now = first
    while now < first + POLICY.open_max_ms - SECOND_MS:
        now += SECOND_MS
        t.place(1, HOUR, 1, now)  # a late event every second: never idle
        if now < first + POLICY.open_max_ms:
            assert t.due(now, "due") == [], now
    now = first + POLICY.open_max_ms
    t.place(1, HOUR, 1, now)
    assert t.due(now, "due") == [(1, HOUR, 0)]


def test_a_full_block_is_due_in_every_mode_even_in_its_hour() -> None:
    t = table()
    t.place(1, HOUR, POLICY.bytes_max - 1, T0)
    assert t.due(T0, "due") == []
    t.place(1, HOUR, 1, T0)
    for mode in ("due", "closed", "all"):
        assert t.due(T0, mode) == [(1, HOUR, 0)]


def test_due_lists_only_what_is_due_sorted() -> None:
    t = table()
    t.place(3, HOUR, 10, T0)
    t.place(1, HOUR, 10, T0)
    t.place(2, HOUR + 1, 10, T0 + HOUR_MS)  # the next hour: still open at CLOSED
    t.place(4, HOUR + 1, POLICY.bytes_max, T0 + HOUR_MS)  # full
    assert t.due(CLOSED, "due") == [(1, HOUR, 0), (3, HOUR, 0), (4, HOUR + 1, 0)]
    assert t.due(CLOSED, "all") == [
        (1, HOUR, 0),
        (2, HOUR + 1, 0),
        (3, HOUR, 0),
        (4, HOUR + 1, 0),
    ]


def test_due_does_not_change_the_table() -> None:
    t = table()
    t.place(1, HOUR, 10, T0)
    t.due(CLOSED + HOUR_MS, "all")
    assert t.place(1, HOUR, 1, T0) == 0
    assert t.open[(1, HOUR)].bytes == 11


# --------------------------------------------------------------------------- load


def info(key: BlockKey, nbytes: int, seal_index: int = 0) -> BlockInfo:
    return BlockInfo(
        key, bytes=nbytes, entries=1, first_index=1, last_index=1, seal_index=seal_index
    )


def test_load_rebuilds_open_parts_and_next_parts() -> None:
    blocks = {
        (1, HOUR, 0): info((1, HOUR, 0), 100, seal_index=7),
        (1, HOUR, 1): info((1, HOUR, 1), 40),
        (2, HOUR, 0): info((2, HOUR, 0), 50, seal_index=9),
        (2, HOUR, 1): info((2, HOUR, 1), 60, seal_index=12),
        (3, HOUR + 1, 0): info((3, HOUR + 1, 0), 70),
        (CONTROL_SHARD, 0, 0): info((CONTROL_SHARD, 0, 0), 36),
    }
    t = table()
    t.place(9, HOUR, 5, T0)  # forgotten by load: the log is the truth
    t.load(blocks, T0 + 42)
    assert set(t.open) == {(1, HOUR), (3, HOUR + 1)}
    assert t.open[(1, HOUR)].key == (1, HOUR, 1)
    assert t.open[(1, HOUR)].bytes == 40
    assert t.open[(1, HOUR)].first_append_ms == T0 + 42
    assert t.open[(1, HOUR)].last_append_ms == T0 + 42
    assert all(shard != CONTROL_SHARD for shard, _hour in t.open)
    assert all(shard != CONTROL_SHARD for shard, _hour in t.next_part)
    assert t.place(1, HOUR, 1, T0) == 1  # the open part goes on
    assert t.place(2, HOUR, 1, T0) == 2  # both parts sealed: the next one
    assert t.place(3, HOUR + 1, 1, T0) == 0
    assert t.place(9, HOUR, 1, T0) == 0
    assert t.open[(1, HOUR)].bytes == 41


def test_load_counts_bytes_towards_the_size_limit() -> None:
    t = table()
    t.load({(1, HOUR, 0): info((1, HOUR, 0), POLICY.bytes_max)}, T0)
    assert t.due(T0, "due") == [(1, HOUR, 0)]


def test_load_restarts_the_idle_clock() -> None:
    t = table()
    t.load({(1, HOUR, 0): info((1, HOUR, 0), 10)}, CLOSED + HOUR_MS)
    assert t.due(CLOSED + HOUR_MS, "due") == []
    assert t.due(CLOSED + HOUR_MS + POLICY.idle_ms, "due") == [(1, HOUR, 0)]


def test_load_of_nothing_empties_the_table() -> None:
    t = table()
    t.place(1, HOUR, 1, T0)
    t.load({}, T0)
    assert t.open == {}
    assert t.next_part == {}
    assert t.oldest_open_hour() is None


# --------------------------------------------------------------------------- oldest


def test_oldest_open_hour() -> None:
    t = table()
    assert t.oldest_open_hour() is None
    t.place(1, HOUR + 2, 1, T0)
    t.place(2, HOUR, 1, T0)
    t.place(3, HOUR + 1, 1, T0)
    assert t.oldest_open_hour() == HOUR
    t.sealed((2, HOUR, 0))
    assert t.oldest_open_hour() == HOUR + 1
    t.sealed((3, HOUR + 1, 0))
    t.sealed((1, HOUR + 2, 0))
    assert t.oldest_open_hour() is None
