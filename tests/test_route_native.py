"""The C routing pass (flowray.ingest._native.group and learn) against numpy's.

route_table orders a request's rows by (rank of their site's shard, hour) with the C
pass where it is built, and with numpy where it is not; both must give the same order
and the same runs for any table, any shard map, a table that is a slice or in chunks,
and a site cache that is emptied under it (by its bound, or by other threads).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.core.invariant import InvariantError
from flowray.core.router import ShardMap, shard_for_site
from flowray.ingest import pieces as ingest
from flowray.ingest.events import EVENT_SCHEMA, Limits, parse_json_body, parse_ndjson_body
from flowray.ingest.pieces import HOUR_MS, route, route_table, routing_for

native = pytest.importorskip("flowray.ingest._native")

T0 = 1_584_170_439_595  # 2020-03-14T07:20:39.595Z
# Lengths 1 to 253 (a host name's bound), across the C hash's 8-byte words.
SITES = [f"s{i}.example" for i in range(30)] + [
    "a",
    "ab.c",
    "x" * 7 + ".io",
    "y" * 15 + ".io",
    ".".join(["z" * 63] * 3) + ".abcdefghijklmnopqrstuvwxyz0123456789-abcdefghijklmnopq",
    "xn--bcher-kva.de",
]

rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "ts": st.integers(T0 - 5 * HOUR_MS, T0 + 5 * HOUR_MS),
            "site": st.sampled_from(SITES),
        },
        optional={"path": st.sampled_from(["/", "/a"]), "id": st.sampled_from(["i1", "i2"])},
    ),
    min_size=1,
    max_size=300,
)
owner_maps = st.lists(st.integers(0, 3), min_size=1, max_size=12).map(
    lambda owners: ShardMap(tuple(owners))
)


def table_of(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def same_runs(table: pa.Table, shard_map: ShardMap) -> None:
    native_order, native_runs = ingest._native_runs(table, shard_map)
    numpy_order, numpy_runs = ingest._numpy_runs(table, shard_map)
    assert native_runs == numpy_runs
    if numpy_order is None:
        assert native_order is None
    else:
        assert native_order is not None
        assert native_order.tolist() == numpy_order.tolist()


@given(rows=rows_strategy, shard_map=owner_maps)
@settings(max_examples=150, deadline=None)
def test_the_c_pass_orders_as_numpy_does(rows: list[dict[str, Any]], shard_map: ShardMap) -> None:
    same_runs(table_of(rows), shard_map)


@given(rows=rows_strategy, cut=st.data(), shard_map=owner_maps)
@settings(max_examples=60, deadline=None)
def test_a_sliced_or_chunked_table(
    rows: list[dict[str, Any]], cut: st.DataObject, shard_map: ShardMap
) -> None:
    """Slices start at an offset into the site and time buffers; chunks are joined."""
    table = table_of(rows)
    lo = cut.draw(st.integers(0, len(rows) - 1))
    hi = cut.draw(st.integers(lo + 1, len(rows)))
    same_runs(table.slice(lo, hi - lo), shard_map)
    chunked = pa.concat_tables([table.slice(0, lo), table.slice(lo)])
    same_runs(chunked, shard_map)


def test_rows_in_order_need_no_order() -> None:
    table = table_of([{"ts": T0, "site": "s1.example"}] * 5)
    order, runs = ingest._native_runs(table, ShardMap.round_robin(4, 2))
    assert order is None
    assert len(runs) == 1 and runs[0][2:] == (0, 5)


def test_a_known_order() -> None:
    """Rows of two hours and two groups: group 0's shards first, each (shard, hour) run
    in arrival order."""
    shard_map = ShardMap.round_robin(4, 2)
    sites = sorted(SITES[:12], key=lambda s: shard_for_site(s, 4))
    rows = [{"ts": T0 + (i % 2) * HOUR_MS, "site": s} for i, s in enumerate(sites * 3)]
    order, runs = ingest._native_runs(table_of(rows), shard_map)
    assert order is not None
    rank = ingest._shard_order(shard_map.owners)[0]
    keys = [(rank[shard_for_site(r["site"], 4)], r["ts"] // HOUR_MS) for r in rows]
    assert order.tolist() == sorted(range(len(rows)), key=lambda i: keys[i])
    assert sum(n for *_, n in runs) == len(rows)


def test_a_site_cache_that_is_emptied(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache bound below the table's distinct sites: the C pass declines and numpy
    routes; a bound it can keep: the cache is emptied and refilled, and answers stay
    right."""
    rows = [{"ts": T0 + i * 1000, "site": SITES[i % len(SITES)]} for i in range(500)]
    table = table_of(rows[::-1])
    shard_map = ShardMap.round_robin(8, 2)
    expected = ingest._numpy_runs(table, shard_map)
    for bound in (3, len(SITES), len(SITES) + 1, 10_000):
        monkeypatch.setattr(ingest, "SHARDS_CACHED_MAX", bound)
        for shard_count in (8, 9, 8):  # another shard count's sites share the cache
            routed = ingest._native_runs(table, ShardMap.round_robin(shard_count, 2))
            if shard_count == 8:
                assert routed[1] == expected[1]
                assert np.array_equal(routed[0], expected[0])


def test_threads_routing_while_the_cache_is_emptied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads route tables of different sites through a cache too small for all of
    them, so it is emptied again and again under each of them."""
    monkeypatch.setattr(ingest, "SHARDS_CACHED_MAX", 64)
    shard_map = ShardMap.round_robin(8, 2)
    tables = [
        table_of([{"ts": T0 + i, "site": f"t{k}-{i % 50}.example"} for i in range(400)][::-1])
        for k in range(4)
    ]
    expected = [route_table(t, shard_map) for t in tables]
    wrong: list[int] = []

    def work(k: int) -> None:
        for _ in range(50):
            got = route_table(tables[k], shard_map)
            if {g: (r.runs, r.table.to_pylist()) for g, r in got.items()} != {
                g: (r.runs, r.table.to_pylist()) for g, r in expected[k].items()
            }:
                wrong.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []


def test_learn_and_group_refuse_bad_input() -> None:
    offsets = np.array([0, 1, 2], dtype=np.int32).tobytes()
    ts = np.array([T0, T0], dtype=np.int64).tobytes()
    ranks = np.arange(4, dtype=np.int64).tobytes()
    with pytest.raises(ValueError, match="sites and shards differ"):
        native.learn(4, [b"a"], [0, 1], 10)
    with pytest.raises(ValueError, match="bad shard"):
        native.learn(4, [b"a"], [4], 10)
    with pytest.raises(ValueError, match="bad shard"):
        native.learn(4, ["a"], [1], 10)
    with pytest.raises(ValueError, match="too many"):
        native.learn(4, [b"a", b"b"], [1, 2], 1)
    with pytest.raises(ValueError, match="shorter than n rows"):
        native.group(offsets, b"ab", ts, 3, 4, ranks, HOUR_MS)
    with pytest.raises(ValueError, match="bad ranks"):
        native.group(offsets, b"ab", ts, 2, 5, ranks, HOUR_MS)
    bad = np.array([0, 1, 9], dtype=np.int32).tobytes()
    native.learn(4, [b"a"], [1], 1 << 18)
    with pytest.raises(ValueError, match="offsets out of range"):
        native.group(bad, b"ab", ts, 2, 4, ranks, HOUR_MS)
    early = np.array([T0, -5], dtype=np.int64).tobytes()
    native.learn(4, [b"b"], [2], 1 << 18)
    with pytest.raises(ValueError, match="out of range"):
        native.group(offsets, b"ab", early, 2, 4, ranks, HOUR_MS)
    assert native.group(offsets, b"ab", ts, 2, 4, ranks, HOUR_MS) == (
        None,
        [(1, T0 // HOUR_MS, 0, 1), (2, T0 // HOUR_MS, 1, 1)],
    )


def test_out_of_contract_arguments_are_refused() -> None:
    """Sizes whose products would overflow, and shards that are not exact ints (reading
    one must run no Python code while the cache changes)."""

    class Index:
        def __index__(self) -> int:
            return 1

    ts = np.array([T0], dtype=np.int64).tobytes()
    with pytest.raises(ValueError, match="shorter than n rows"):
        native.group(b"\0" * 8, b"", b"", 2**61, 1, b"\0" * 8, HOUR_MS)
    with pytest.raises(ValueError, match="bad ranks"):
        native.group(b"\0" * 8, b"", ts, 1, 2**61 + 1, b"\0" * 8, HOUR_MS)
    with pytest.raises(ValueError, match="too many"):
        native.learn(2**61, [b"a"], [1], 10)
    for shard in (Index(), True, 2**70, 1.0):
        with pytest.raises(ValueError, match="bad shard"):
            native.learn(4, [b"a"], [shard], 10)
    with pytest.raises(ValueError, match="not bytes"):
        native.learn(4, [bytearray(b"a")], [1], 10)


def test_unaligned_buffers() -> None:
    """Buffers at any byte offset are read as they are (memcpy, not a cast)."""
    native.learn(3, [b"ua", b"ub"], [0, 2], 1 << 18)  # ranks 1 and 0
    offsets = b"\0" + np.array([0, 2, 4], dtype=np.int32).tobytes()
    ts = b"\0" * 3 + np.array([T0, T0], dtype=np.int64).tobytes()
    ranks = b"\0" * 5 + np.array([1, 2, 0], dtype=np.int64).tobytes()
    order, runs = native.group(
        memoryview(offsets)[1:], b"uaub", memoryview(ts)[3:], 2, 3, memoryview(ranks)[5:], HOUR_MS
    )
    assert np.frombuffer(order, dtype=np.int64).tolist() == [1, 0]
    assert runs == [(0, T0 // HOUR_MS, 0, 1), (1, T0 // HOUR_MS, 1, 1)]


def test_unseen_sites_are_named() -> None:
    offsets = np.array([0, 3, 6, 9], dtype=np.int32).tobytes()
    ts = np.array([T0] * 3, dtype=np.int64).tobytes()
    ranks = np.arange(7, dtype=np.int64).tobytes()
    missing = native.group(offsets, b"u1xu2xu1x", ts, 3, 7, ranks, HOUR_MS)
    assert isinstance(missing, list) and set(missing) == {b"u1x", b"u2x"}
    native.learn(7, [b"u1x", b"u2x"], [5, 3], 1 << 18)
    order, runs = native.group(offsets, b"u1xu2xu1x", ts, 3, 7, ranks, HOUR_MS)
    assert np.frombuffer(order, dtype=np.int64).tolist() == [1, 0, 2]
    assert runs == [(3, T0 // HOUR_MS, 0, 1), (5, T0 // HOUR_MS, 1, 2)]


# ---- the C parser's rows in routing order (Limits.routing) ----------------------------

NOW = T0 + 10 * HOUR_MS


def body_of(rows: list[dict[str, Any]], form: str) -> bytes:
    if form == "ndjson":
        return b"\n".join(orjson.dumps(r) for r in rows)
    return orjson.dumps(rows)


def routed_parts(groups: dict[int, Any]) -> dict[int, tuple[Any, Any]]:
    return {g: (r.runs, r.table.to_pylist()) for g, r in groups.items()}


@given(
    rows=rows_strategy,
    shard_map=owner_maps,
    form=st.sampled_from(["ndjson", "json"]),
    learned=st.booleans(),
)
@settings(max_examples=120, deadline=None)
def test_the_parser_orders_rows_as_route_table_does(
    rows: list[dict[str, Any]], shard_map: ShardMap, form: str, learned: bool
) -> None:
    """Parsed with a Routing, a body's rows come in route_table's order with its runs
    (sites learned), or as parsed without runs (a site not learned); either way they
    route to the same groups, runs and rows as a body parsed without one."""
    body = body_of(rows, form)
    parse = parse_ndjson_body if form == "ndjson" else parse_json_body
    plain = parse(body, Limits(now_ms=NOW))
    if learned:
        route_table(plain, shard_map)  # learns every site's shard
    else:
        native.learn(shard_map.shard_count, [b"-"], [0], 1)  # empties the cache
    routing = routing_for(shard_map)
    assert routing is not None
    ordered = parse(body, Limits(now_ms=NOW, routing=routing))
    assert routing.table is (ordered if learned else None)
    assert (routing.runs is not None) == learned
    if not learned:
        assert ordered.equals(plain)
    assert routed_parts(route(ordered, shard_map, routing)) == routed_parts(route(plain, shard_map))


def test_sites_not_in_their_normal_form_are_not_ordered() -> None:
    """An upper-case site is normalized after the parse: the parser cannot order by
    it, and leaves the rows as they came."""
    rows = [{"ts": T0 + i, "site": s} for i, s in enumerate(["B.example", "a.example"] * 3)]
    shard_map = ShardMap.round_robin(4, 2)
    route_table(table_of([{"ts": T0, "site": s} for s in ("b.example", "a.example")]), shard_map)
    routing = routing_for(shard_map)
    assert routing is not None
    table = parse_ndjson_body(body_of(rows, "ndjson"), Limits(now_ms=NOW, routing=routing))
    assert routing.runs is None and routing.table is None
    assert table.column("site").to_pylist()[:2] == ["b.example", "a.example"]


def test_rows_ordered_for_another_map_are_refused() -> None:
    rows = [{"ts": T0, "site": s} for s in SITES[:8]]
    shard_map, other = ShardMap.round_robin(4, 2), ShardMap((1, 0, 1, 0))
    route_table(table_of(rows), shard_map)
    routing = routing_for(shard_map)
    assert routing is not None
    table = parse_ndjson_body(body_of(rows, "ndjson"), Limits(now_ms=NOW, routing=routing))
    assert routing.runs is not None
    with pytest.raises(InvariantError, match="another map"):
        route(table, other, routing)


def test_bad_routing_arguments() -> None:
    body = b'{"site":"a.example"}'
    with pytest.raises(ValueError, match="bad routing"):
        native.ndjson(body, NOW, 0, NOW, 100, 100, 10, 2, b"\0" * 8, HOUR_MS)
    with pytest.raises(ValueError, match="bad routing"):
        native.ndjson(body, NOW, 0, NOW, 100, 100, 10, 1, b"\0" * 8, 0)
    with pytest.raises(ValueError, match="bad routing"):
        native.json(body, NOW, 0, NOW, 100, 100, 10, 2**40, b"\0" * 8, HOUR_MS)
    with pytest.raises(ValueError, match="bad routing"):
        native.ndjson(body, NOW, 0, NOW, 100, 100, 10, 1, b"\0" * 8)  # no hour_ms
    with pytest.raises(ValueError, match="bad routing"):
        native.ndjson(body, NOW, 0, NOW, 100, 100, 10, 1, None, HOUR_MS)
    for parsed in (
        native.ndjson(body, NOW, 0, NOW, 100, 100, 10),
        native.ndjson(body, NOW, 0, NOW, 100, 100, 10, 0, None, 0),
    ):
        assert parsed is not None and parsed[4] is None
