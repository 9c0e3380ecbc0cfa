"""Tests for flowray.ingest.pieces.split_batch: every event in exactly one right piece."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.core.invariant import InvariantError
from flowray.core.router import ShardMap, shard_for_site
from flowray.ingest.events import EVENT_SCHEMA
from flowray.ingest.pieces import (
    COMPRESS_ROWS_MIN,
    HOUR_MS,
    Piece,
    Routed,
    from_ipc,
    from_ipc_many,
    merge_pieces,
    route_table,
    split_batch,
    to_ipc,
    to_ipc_compressed,
)

SEED_MAP = ShardMap.round_robin(10, 5)
T0 = 1_584_170_439_595  # 2020-03-14T07:20:39.595Z
SITES = [f"site{i}.example" for i in range(40)] + ["taobao.com", "xn--bcher-kva.de"]

Row = tuple[Any, ...]


def rows_of(table: pa.Table) -> list[Row]:
    return [tuple(r.values()) for r in table.to_pylist()]


def events(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def check_split(table: pa.Table, shard_map: ShardMap) -> dict[int, list[Piece]]:
    """Assert every rule of split_batch on ``table``; return the split for more checks."""
    out = split_batch(table, shard_map)
    seen: list[Row] = []
    blocks: set[tuple[int, int]] = set()
    for group, pieces in out.items():
        assert 0 <= group < shard_map.group_count
        assert pieces, "a group listed without pieces"
        for piece in pieces:
            assert shard_map.group_of_shard(piece.shard) == group
            assert (piece.shard, piece.hour) not in blocks, "one piece per (shard, hour)"
            blocks.add((piece.shard, piece.hour))
            part = from_ipc(piece.payload)
            assert part.schema == EVENT_SCHEMA
            assert part.num_rows == piece.events > 0
            for row in part.to_pylist():
                assert shard_for_site(row["site"], shard_map.shard_count) == piece.shard
                assert shard_map.group_of_site(row["site"]) == group
                assert row["ts"] // HOUR_MS == piece.hour
            seen.extend(rows_of(part))
    assert Counter(seen) == Counter(rows_of(table)), "events lost or duplicated"
    return out


event_rows = st.lists(
    st.fixed_dictionaries(
        {
            "ts": st.integers(T0 - 3 * HOUR_MS, T0 + 3 * HOUR_MS),
            "site": st.sampled_from(SITES),
        },
        optional={
            "path": st.sampled_from(["/", "/a", "/b?q=1"]),
            "referrer": st.sampled_from(["https://r.example/", ""]),
            "ua": st.text(max_size=5),
            "visitor": st.sampled_from(["v1", "v2"]),
            "id": st.sampled_from(["i1", "i2", "i3"]),
        },
    ),
    max_size=200,
)


@given(rows=event_rows, layout=st.sampled_from([(10, 5), (10, 1), (7, 3), (1, 1), (16, 16)]))
@settings(max_examples=60, deadline=None)
def test_split_preserves_every_event_once(
    rows: list[dict[str, Any]], layout: tuple[int, int]
) -> None:
    check_split(events(rows), ShardMap.round_robin(*layout))


@given(rows=event_rows, chunks=st.integers(1, 4))
@settings(max_examples=20, deadline=None)
def test_split_of_a_chunked_table(rows: list[dict[str, Any]], chunks: int) -> None:
    table = events(rows)
    step = max(1, len(rows) // chunks)
    parts = [table.slice(i, step) for i in range(0, len(rows), step)] or [table]
    check_split(pa.concat_tables(parts), SEED_MAP)


def test_empty_batch() -> None:
    assert split_batch(events([]), SEED_MAP) == {}


def test_pieces_keep_arrival_order() -> None:
    rows = [
        {"ts": T0 + (i % 3) * HOUR_MS + i, "site": SITES[i % 7], "path": f"/{i}"}
        for i in range(300)
    ]
    out = check_split(events(rows), SEED_MAP)
    for pieces in out.values():
        for piece in pieces:
            positions = [int(r["path"][1:]) for r in from_ipc(piece.payload).to_pylist()]
            assert positions == sorted(positions)


def test_groups_and_hours_of_a_known_batch() -> None:
    hour = T0 // HOUR_MS
    rows = [
        {"ts": T0, "site": "taobao.com"},  # shard 3 → group 3
        {"ts": T0 + HOUR_MS, "site": "taobao.com"},
        {"ts": T0 + 1, "site": "example.com"},  # shard 1 → group 1
        {"ts": T0 + 2, "site": "google.com"},  # shard 1 → group 1
        {"ts": T0 + 3, "site": "xn--bcher-kva.de"},  # shard 5 → group 0
    ]
    out = check_split(events(rows), SEED_MAP)
    got = {g: sorted((p.shard, p.hour, p.events) for p in ps) for g, ps in out.items()}
    assert got == {
        0: [(5, hour, 1)],
        1: [(1, hour, 2)],
        3: [(3, hour, 1), (3, hour + 1, 1)],
    }


def test_a_moved_shard_goes_to_its_new_group() -> None:
    moved = ShardMap.from_json([0, 1, 2, 4, 4, 0, 1, 2, 3, 4])  # shard 3 moved to group 4
    out = check_split(events([{"ts": T0, "site": "taobao.com"}]), moved)
    assert list(out) == [4]
    assert out[4][0].shard == 3


def test_hour_boundaries() -> None:
    start = (T0 // HOUR_MS + 1) * HOUR_MS
    rows = [{"ts": t, "site": "taobao.com"} for t in (start - 1, start, start + HOUR_MS - 1)]
    out = check_split(events(rows), SEED_MAP)
    assert sorted((p.hour, p.events) for p in out[3]) == [
        (start // HOUR_MS - 1, 1),
        (start // HOUR_MS, 2),
    ]


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_ipc_round_trip(n: int) -> None:
    table = events([{"ts": T0 + i, "site": SITES[i % len(SITES)], "id": str(i)} for i in range(n)])
    assert from_ipc(to_ipc(table)).equals(table)


def test_pieces_of_many_events_are_compressed_and_small_ones_not() -> None:
    rows = [{"ts": T0 + i, "site": "taobao.com", "path": "/a"} for i in range(COMPRESS_ROWS_MIN)]
    (piece,) = split_batch(events(rows), ShardMap.round_robin(1, 1))[0]
    (small,) = split_batch(events(rows[:-1]), ShardMap.round_robin(1, 1))[0]
    raw = to_ipc(events(rows))
    assert len(piece.payload) < len(raw)  # LZ4 over repeated sites and null columns
    many = events([{"ts": T0 + i, "site": SITES[i % len(SITES)]} for i in range(1000)])
    (big,) = split_batch(many, ShardMap.round_robin(1, 1))[0]
    assert len(big.payload) < len(to_ipc(many)) // 3
    assert from_ipc(piece.payload).equals(events(rows))
    assert small.payload == to_ipc(events(rows[:-1]))
    # Any Arrow reader decodes it: the stream carries Arrow's own body compression.
    reader = pa.ipc.open_stream(piece.payload)
    assert reader.read_all().num_rows == COMPRESS_ROWS_MIN


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_compressed_ipc_round_trip(n: int) -> None:
    table = events(
        [{"ts": T0 + i, "site": SITES[i % len(SITES)], "ua": "x" * (i % 7)} for i in range(n)]
    )
    assert from_ipc(to_ipc(table, compress=True)).equals(table)


@given(
    parts=st.lists(st.tuples(event_rows, st.booleans()), min_size=1, max_size=8),
)
@settings(max_examples=80, deadline=None)
def test_payloads_read_together_as_one_table(
    parts: list[tuple[list[dict[str, Any]], bool]],
) -> None:
    """Pieces compressed or not, empty or not, read as one stream: the same rows, in
    the same order, as reading them one by one."""
    payloads = [to_ipc(events(rows), compress=packed) for rows, packed in parts]
    together = from_ipc_many(payloads)
    assert together.schema == EVENT_SCHEMA
    assert rows_of(together) == [r for p in payloads for r in rows_of(from_ipc(p))]


def test_payloads_not_of_the_usual_form_are_read_one_by_one() -> None:
    """A stream without the end marker, or another spelling of the schema, is read on
    its own: the joined read never cuts a payload it does not know."""
    good = to_ipc(events([{"ts": T0, "site": "a.com"}]))
    unended = to_ipc(events([{"ts": T0 + 1, "site": "b.com"}]))[: -len(b"\xff" * 4 + b"\0" * 4)]
    noted = pa.BufferOutputStream()
    with pa.ipc.new_stream(noted, EVENT_SCHEMA.with_metadata({"x": "y"})) as writer:
        writer.write_table(events([{"ts": T0 + 2, "site": "c.com"}]))
    spelled = noted.getvalue().to_pybytes()
    assert [r[1] for r in rows_of(from_ipc_many([good, unended]))] == ["a.com", "b.com"]
    assert [r[1] for r in rows_of(from_ipc_many([good, spelled]))] == ["a.com", "c.com"]
    # Two streams in one payload: an end marker inside it would end a joined read there.
    doubled = good + to_ipc(events([{"ts": T0 + 3, "site": "e.com"}]))
    two = from_ipc_many([doubled, good])
    assert rows_of(two) == rows_of(from_ipc(doubled)) + rows_of(from_ipc(good))
    alien = to_ipc(pa.table({"site": ["d.com"]}))
    with pytest.raises(pa.ArrowInvalid):  # concatenated as tables: the schemas differ
        from_ipc_many([good, alien])
    with pytest.raises(InvariantError):
        from_ipc_many([])


owner_maps = st.lists(st.integers(0, 3), min_size=1, max_size=12).map(
    lambda owners: ShardMap(tuple(owners))
)


@given(groups=st.lists(event_rows, min_size=0, max_size=5), chunks=st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_tables_compressed_by_one_writer_are_each_as_written_alone(
    groups: list[list[dict[str, Any]]], chunks: int
) -> None:
    """to_ipc_compressed cuts one writer's stream per table: byte for byte what a
    writer per table (to_ipc) makes, for any sizes (none and one included) and chunks."""
    tables = []
    for rows in groups:
        table = events(rows)
        step = max(1, -(-len(rows) // chunks))
        tables.append(
            pa.concat_tables([table.slice(i, step) for i in range(0, len(rows), step)] or [table])
        )
    assert to_ipc_compressed(tables) == [to_ipc(t, compress=True) for t in tables]


@given(requests=st.lists(event_rows, min_size=1, max_size=4), shard_map=owner_maps)
@settings(max_examples=80, deadline=None)
def test_requests_routed_then_merged_keep_arrival_order(
    requests: list[list[dict[str, Any]]], shard_map: ShardMap
) -> None:
    """What the ingress does: each request routed once (route_table), a group's queued
    requests merged into one proposal's pieces (merge_pieces). Each piece holds exactly
    its (shard, hour)'s events, in arrival order across the requests, under any
    assignment of shards to groups (moved shards included)."""
    tables = [events(rows) for rows in requests]
    routed: dict[int, list[Routed]] = {}
    for table in tables:
        for group, item in route_table(table, shard_map).items():
            assert item.num_rows > 0
            routed.setdefault(group, []).append(item)
    arrived = [row for table in tables for row in table.to_pylist()]
    for group, items in routed.items():
        pieces = merge_pieces(items)
        assert len({(p.shard, p.hour) for p in pieces}) == len(pieces)
        for piece in pieces:
            assert shard_map.group_of_shard(piece.shard) == group
            expected = [
                tuple(row.values())
                for row in arrived
                if shard_for_site(row["site"], shard_map.shard_count) == piece.shard
                and row["ts"] // HOUR_MS == piece.hour
            ]
            assert rows_of(from_ipc(piece.payload)) == expected
            assert piece.events == len(expected)
    total = sum(p.events for items in routed.values() for p in merge_pieces(items))
    assert total == len(arrived)
