"""Tests for the pure map, reduce and write steps of flowray.tasks.mapreduce (no Ray).

The pipeline's output is checked against an independent DuckDB count of the raw events.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.core.router import reduce_key_for_shard, shard_for_site
from flowray.ingest.events import EVENT_SCHEMA
from flowray.ingest.pieces import HOUR_MS, to_ipc
from flowray.tasks.mapreduce import (
    PARTIAL_SCHEMA,
    _packed,
    map_block_slices,
    reduce_partials,
    rewrite_units,
    write_units,
)
from flowray.warehouse.catalog import Unit

SHARDS = 4
T0 = 1_584_169_200_000  # 2020-03-14T07:00:00Z, the start of an hour
HOUR = T0 // HOUR_MS
SITES = [f"shop{i}.example" for i in range(25)] + ["taobao.com"]

Block = tuple[int, int]
Count = tuple[int, int, str, int, int]  # shard, hour, site, minute ms, count


def random_events(rng: random.Random, n: int) -> pa.Table:
    """Events over three hours; about a third carry an id, and some are sent twice."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {
            "ts": T0 + rng.randrange(3 * HOUR_MS),
            "site": rng.choice(SITES),
            "path": rng.choice(["/", "/cart", None]),
            "visitor": rng.choice(["v1", "v2", "v3", None]),
            "name": rng.choice([None, None, "pageview", "Signup"]),
            "id": f"id-{i}" if rng.random() < 0.35 else None,
        }
        rows.append(row)
        if row["id"] is not None and rng.random() < 0.3:
            rows.append(dict(row))  # a retry: same (site, id), same event
        if row["id"] is None and rng.random() < 0.05:
            rows.append(dict(row))  # two identical page views without id: both count
    rng.shuffle(rows)
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def expected_counts(raw: pa.Table) -> list[Count]:
    """Count per (site, minute) with DuckDB directly, each (site, id) once."""
    con = duckdb.connect(config={"threads": 1})
    con.register("raw", raw)
    rows = con.sql(
        "SELECT site, ts // 60000 * 60000 AS minute, count(*) AS n FROM ("
        " SELECT site, ts FROM raw WHERE id IS NULL"
        " UNION ALL SELECT site, min(ts) FROM raw WHERE id IS NOT NULL GROUP BY site, id"
        ") GROUP BY ALL"
    ).fetchall()
    con.close()
    return sorted(
        (shard_for_site(site, SHARDS), minute // HOUR_MS, site, minute, n)
        for site, minute, n in rows
    )


def blocks_of(raw: pa.Table) -> dict[Block, pa.Table]:
    """The raw events of each (shard, hour) block, as the log would hold them."""
    by_block: dict[Block, list[dict[str, Any]]] = defaultdict(list)
    for row in raw.to_pylist():
        by_block[(shard_for_site(row["site"], SHARDS), row["ts"] // HOUR_MS)].append(row)
    return {k: pa.Table.from_pylist(v, schema=EVENT_SCHEMA) for k, v in by_block.items()}


def random_slices(rng: random.Random, table: pa.Table) -> list[list[bytes]]:
    """Cut a block at random rows into up to 5 payloads, grouped into slices of 1..3."""
    cuts = sorted(rng.sample(range(1, table.num_rows), min(table.num_rows - 1, 4)))
    payloads = [
        to_ipc(table.slice(lo, hi - lo))
        for lo, hi in zip([0, *cuts], [*cuts, table.num_rows], strict=True)
    ]
    slices: list[list[bytes]] = []
    while payloads:
        take = rng.randint(1, 3)
        slices.append(payloads[:take])
        payloads = payloads[take:]
    return slices


def run_pipeline(
    rng: random.Random, raw: pa.Table, keys: int, root: Path, job: str = "job1"
) -> tuple[list[Unit], list[list[pa.Table]]]:
    blocks = blocks_of(raw)
    tasks: list[tuple[list[Block], list[list[bytes]]]] = []
    for block, table in sorted(blocks.items()):
        for payloads in random_slices(rng, table):
            tasks.append(([block], [payloads]))
    rng.shuffle(tasks)
    # Several slices per map task, of different blocks, and an empty slice now and then.
    merged: list[tuple[list[Block], list[list[bytes]]]] = []
    for i in range(0, len(tasks), 6):
        group = tasks[i : i + 6]
        merged.append(
            (
                [b for bs, _ in group for b in bs] + [(0, HOUR)],
                [p for _, ps in group for p in ps] + [[]],
            )
        )
    map_outputs = [map_block_slices(bs, ps, "default", keys) for bs, ps in merged]
    assert all(len(out) == keys for out in map_outputs)
    by_key = [[out[k] for out in map_outputs] for k in range(keys)]
    reduced = [reduce_partials(partials) for partials in by_key]
    units = [(shard, hour, 1) for shard, hour in sorted(blocks)]
    return write_units(root, "default", job, reduced, units), by_key


def file_counts(unit: Unit) -> list[Count]:
    """Events per (site, minute) of a unit file, whose facts split a minute by visitor,
    event name and dimensions."""
    table = pq.read_table(unit.path)
    minutes = table.column("minute").cast(pa.int64()).to_pylist()
    keys = list(zip(table.column("site").to_pylist(), minutes, strict=True))
    assert keys == sorted(keys), "a file must be sorted by (site, minute)"
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for key, n in zip(keys, table.column("count").to_pylist(), strict=True):
        counts[key] += n
    return [
        (unit.shard, unit.hour, site, minute, n) for (site, minute), n in sorted(counts.items())
    ]


def expected_facts(raw: pa.Table) -> list[tuple[Any, ...]]:
    """(site, hour, path, name, events, distinct visitors) with DuckDB directly, each
    (site, id) once: what the facts of the units must add up to."""
    con = duckdb.connect(config={"threads": 1})
    con.register("raw", raw)
    rows = con.sql(
        "SELECT site, ts // 3600000 AS hour, coalesce(path, '') AS p,"
        " coalesce(name, 'pageview') AS nm, count(*) AS n, count(DISTINCT visitor) AS v FROM ("
        " SELECT site, ts, path, name, visitor FROM raw WHERE id IS NULL"
        " UNION ALL SELECT site, ts, path, name, visitor FROM ("
        "  SELECT *, row_number() OVER (PARTITION BY site, id"
        "  ORDER BY ts // 60000, hash(visitor), coalesce(name, 'pageview'), path) AS k"
        "  FROM raw WHERE id IS NOT NULL) WHERE k = 1"
        ") GROUP BY ALL"
    ).fetchall()
    con.close()
    return sorted(rows)


def unit_facts(units: list[Unit]) -> list[tuple[Any, ...]]:
    con = duckdb.connect(config={"threads": 1})
    rows = con.execute(
        "SELECT site, epoch_ms(minute) // 3600000 AS hour, path, name, sum(count)::BIGINT,"
        " count(DISTINCT visitor) FROM read_parquet(?) GROUP BY ALL",
        [[u.path for u in units]],
    ).fetchall()
    con.close()
    return sorted(rows)


@pytest.mark.parametrize("keys", [1, 3, 4])
@given(seed=st.integers(0, 2**32), n=st.integers(1, 400))
@settings(max_examples=4, deadline=None)
def test_pipeline_matches_duckdb(keys: int, seed: int, n: int) -> None:
    rng = random.Random(seed)
    raw = random_events(rng, n)
    with tempfile.TemporaryDirectory() as d:
        units, by_key = run_pipeline(rng, raw, keys, Path(d))
        got: list[Count] = []
        for unit in units:
            rows = file_counts(unit)
            assert all(shard_for_site(r[2], SHARDS) == unit.shard for r in rows)
            assert all(r[3] // HOUR_MS == unit.hour for r in rows)
            assert unit.rows == pq.read_metadata(unit.path).num_rows
            assert unit.events == sum(r[4] for r in rows)
            got.extend(rows)
        assert sorted(got) == expected_counts(raw)
        assert unit_facts(units) == expected_facts(raw)
        # Every site goes to exactly one reduce key: its shard's.
        owners: dict[str, set[int]] = defaultdict(set)
        for k, partials in enumerate(by_key):
            for partial in partials:
                assert partial.schema == PARTIAL_SCHEMA
                for site in set(partial.column("site").to_pylist()):
                    owners[site].add(k)
        assert owners
        assert all(
            ks == {reduce_key_for_shard(shard_for_site(s, SHARDS), keys)}
            for s, ks in owners.items()
        )


def random_partials(rng: random.Random, n: int) -> list[pa.Table]:
    """Map outputs as reduce receives them: rows of several (shard, hour)s spread over a
    few partials, the same keys in more than one, some rows with ids, no visitor or
    the same id twice."""
    rows = []
    for _ in range(n):
        dims = {
            "name": rng.choice(["pageview", "Signup"]),
            "path": rng.choice(["/", "/a", "/b"]),
            **dict.fromkeys(("source", "utm_medium", "utm_campaign", "browser", "os"), ""),
            "device": rng.choice(["desktop", "mobile"]),
        }
        rows.append(
            {
                "shard": rng.randrange(2),
                "hour": HOUR + rng.randrange(2),
                "site": rng.choice(SITES[:4]),
                "minute": T0 + 60_000 * rng.randrange(3),
                "id": rng.choice([None, None, None, "i1", "i2"]),
                "visitor": rng.choice([None, 1, 2, 2**64 - 1]),
                **dims,
                "c": rng.randint(1, 3),
                "e": 0 if dims["name"] == "pageview" else 1,
            }
        )
    con = duckdb.connect(config={"threads": 1})
    without_hash = PARTIAL_SCHEMA.remove(PARTIAL_SCHEMA.names.index("dh"))
    table = pa.Table.from_pylist(rows, schema=without_hash)
    con.register("t", table)
    table = con.sql(f"SELECT *, hash(visitor, {DIMS}) AS dh FROM t").to_arrow_table()
    table = table.select(PARTIAL_SCHEMA.names).cast(PARTIAL_SCHEMA)
    cuts = sorted(rng.sample(range(1, n), min(n - 1, 3))) if n > 1 else []
    return [table.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


DIMS = "name, path, source, utm_medium, utm_campaign, browser, os, device"


@given(seed=st.integers(0, 2**32), n=st.integers(1, 300))
@settings(max_examples=30, deadline=None)
def test_reduce_sums_what_a_group_by_sums_in_the_units_order(seed: int, n: int) -> None:
    partials = random_partials(random.Random(seed), n)
    con = duckdb.connect(config={"threads": 1})
    con.register("x", pa.concat_tables(partials))
    keys = f"shard, hour, site, minute, visitor, {DIMS}"
    expected = con.sql(
        f"SELECT * FROM (SELECT {keys}, sum(c)::BIGINT AS count, sum(e)::BIGINT AS events FROM ("
        f" SELECT {keys}, c, e FROM x WHERE id IS NULL UNION ALL"
        f" SELECT {keys}, 1, (e > 0)::BIGINT FROM (SELECT *, row_number() OVER ("
        f"  PARTITION BY shard, hour, site, id ORDER BY minute, visitor, {DIMS}) AS k"
        "  FROM x WHERE id IS NOT NULL) WHERE k = 1"
        f") GROUP BY ALL) ORDER BY shard, hour, site, minute, visitor IS NULL,"
        f" hash(visitor, {DIMS})"
    ).to_arrow_table()
    got = reduce_partials(partials)
    assert got.to_pylist() == expected.to_pylist()


@given(
    columns=st.lists(
        st.lists(st.integers(0, 2**40), min_size=5, max_size=5), min_size=1, max_size=4
    )
)
@settings(max_examples=50, deadline=None)
def test_packed_keys_sort_as_the_keys_do(columns: list[list[int]]) -> None:
    keys = [np.array(c, dtype=np.int64) for c in columns]
    packed = _packed(keys)
    widths = [int(k.max()) - int(k.min()) + 1 for k in keys]
    if math.prod(widths) >= 2**63:
        assert packed is None
        return
    assert packed is not None
    by_keys = sorted(range(5), key=lambda i: [int(k[i]) for k in keys])
    assert sorted(range(5), key=lambda i: int(packed[i])) == by_keys
    assert len(set(packed.tolist())) == len({tuple(int(k[i]) for k in keys) for i in range(5)})


def test_rows_whose_hashes_collide_stay_apart() -> None:
    row = {
        "shard": 0,
        "hour": HOUR,
        "site": "taobao.com",
        "minute": T0,
        "id": None,
        "visitor": 7,
        "name": "pageview",
        "path": "/a",
        **dict.fromkeys(("source", "utm_medium", "utm_campaign", "browser", "os"), ""),
        "device": "desktop",
        "dh": 42,  # not the real hash: rows that differ made to collide
        "c": 1,
        "e": 0,
    }
    rows = [row, {**row, "path": "/b"}, {**row, "c": 2}, {**row, "visitor": 8}]
    got = reduce_partials([pa.Table.from_pylist(rows, schema=PARTIAL_SCHEMA)])
    assert sorted((r["visitor"], r["path"], r["count"]) for r in got.to_pylist()) == [
        (7, "/a", 3),
        (7, "/b", 1),
        (8, "/a", 1),
    ]
    # A row without a visitor and one with: "no visitor" is part of the sort key, so
    # they never meet; two without one do, and are summed.
    rows = [{**row, "visitor": None}, {**row, "visitor": None, "c": 4}, row]
    got = reduce_partials([pa.Table.from_pylist(rows, schema=PARTIAL_SCHEMA)])
    assert [(r["visitor"], r["count"]) for r in got.to_pylist()] == [(7, 1), (None, 5)]


def test_duplicates_in_different_slices_count_once(tmp_path: Path) -> None:
    site = "taobao.com"
    shard = shard_for_site(site, SHARDS)
    first = T0 + 5 * 60_000 + 123
    a = pa.Table.from_pylist(
        [{"ts": first, "site": site, "id": "x"}, {"ts": first, "site": site, "id": None}],
        schema=EVENT_SCHEMA,
    )
    b = pa.Table.from_pylist(
        [
            {"ts": first, "site": site, "id": "x"},  # the retry, in another slice
            {"ts": first + 90_000, "site": site, "id": "x"},  # a retry stamped later
            {"ts": first, "site": site, "id": None},  # no id: a second page view
        ],
        schema=EVENT_SCHEMA,
    )
    out1 = map_block_slices([(shard, HOUR)], [[to_ipc(a)]], "default", 1)
    out2 = map_block_slices([(shard, HOUR)], [[to_ipc(b)]], "default", 1)
    reduced = reduce_partials([out1[0], out2[0]])
    minute = first // 60_000 * 60_000
    blank = dict.fromkeys(("path", "source", "utm_medium", "utm_campaign", "browser", "os"), "")
    assert reduced.to_pylist() == [
        {
            "shard": shard,
            "hour": HOUR,
            "site": site,
            "minute": minute,
            "visitor": None,
            "name": "pageview",
            **blank,
            "device": "other",
            "count": 3,
            "events": 0,
        }
    ]
    (unit,) = write_units(tmp_path, "default", "j", [reduced], [(shard, HOUR, 2)])
    assert unit == Unit(shard, HOUR, unit.path, 2, 1, 3)
    assert file_counts(unit) == [(shard, HOUR, site, minute, 3)]


def test_writing_the_same_input_twice_gives_identical_files(tmp_path: Path) -> None:
    raw = random_events(random.Random(7), 300)
    runs = []
    for attempt in ("a", "b"):
        units, _ = run_pipeline(random.Random(attempt), raw, 3, tmp_path / attempt)
        runs.append(units)
    assert len(runs[0]) == len(runs[1]) > 1
    for u1, u2 in zip(*runs, strict=True):
        assert (u1.shard, u1.hour, u1.rows, u1.events) == (u2.shard, u2.hour, u2.rows, u2.events)
        assert Path(u1.path).read_bytes() == Path(u2.path).read_bytes()
    # Rewriting in place (a re-run of the same job) also gives the same bytes.
    again, _ = run_pipeline(random.Random("c"), raw, 4, tmp_path / "a")
    assert [Path(u.path).read_bytes() for u in again] == [
        Path(u.path).read_bytes() for u in runs[1]
    ]


def test_map_of_nothing_gives_empty_partials() -> None:
    out = map_block_slices([(0, HOUR), (1, HOUR)], [[], []], "default", 3)
    assert len(out) == 3
    assert all(t.num_rows == 0 and t.schema == PARTIAL_SCHEMA for t in out)
    assert reduce_partials(out).num_rows == 0


def test_a_unit_without_rows_is_an_empty_file(tmp_path: Path) -> None:
    raw = pa.Table.from_pylist([{"ts": T0, "site": "taobao.com"}], schema=EVENT_SCHEMA)
    shard = shard_for_site("taobao.com", SHARDS)
    other = (shard + 1) % SHARDS
    reduced = reduce_partials(map_block_slices([(shard, HOUR)], [[to_ipc(raw)]], "default", 1))
    units = write_units(tmp_path, "default", "j", [reduced], [(shard, HOUR, 1), (other, HOUR, 1)])
    assert [(u.rows, u.events) for u in units] == [(1, 1), (0, 0)]
    assert pq.read_table(units[1].path).num_rows == 0


def test_unknown_logic_is_refused() -> None:
    raw = pa.Table.from_pylist([{"ts": T0, "site": "taobao.com"}], schema=EVENT_SCHEMA)
    with pytest.raises(ValueError, match="unknown processing logic"):
        map_block_slices([(0, HOUR)], [[to_ipc(raw)]], "no-such-logic", 1)


def _reduced_of(raw: pa.Table, logic: str = "default", sites: list[str] | None = None) -> pa.Table:
    shard = shard_for_site("taobao.com", SHARDS)
    return reduce_partials(
        map_block_slices([(shard, HOUR)], [[to_ipc(raw)]], logic, 1, ("tests.logic_bots",), sites)
    )


def _file_rows(path: str) -> list[tuple[str, int]]:
    table = pq.read_table(path)
    return [(r["site"], r["count"]) for r in table.to_pylist()]


def test_rewrite_reports_the_diff_and_keeps_sites_not_redone(tmp_path: Path) -> None:
    shard = shard_for_site("taobao.com", SHARDS)
    other = next(s for s in SITES if shard_for_site(s, SHARDS) == shard and s != "taobao.com")
    rows = [
        {"ts": T0, "site": "taobao.com", "ua": "Googlebot"},
        {"ts": T0 + 1, "site": "taobao.com", "ua": "Mozilla"},
        {"ts": T0 + 60_000, "site": "taobao.com", "ua": "AhrefsBot"},
        {"ts": T0, "site": other, "ua": "Googlebot"},
    ]
    raw = pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)
    (old,) = write_units(tmp_path, "default", "j1", [_reduced_of(raw)], [(shard, HOUR, 1)])
    assert old.events == 4

    # Every site redone with no-bots: both sites change.
    units, diff = rewrite_units(
        tmp_path,
        "no-bots",
        "j2",
        [_reduced_of(raw, "no-bots")],
        [(shard, HOUR, 1)],
        {(shard, HOUR): old.path},
        None,
        False,
    )
    got = {r["site"]: (r["buckets_changed"], r["before"], r["after"]) for r in diff.to_pylist()}
    assert got == {"taobao.com": (2, 3, 1), other: (1, 1, 0)}
    assert units[0].events == 1 and _file_rows(units[0].path) == [("taobao.com", 1)]

    # Only taobao.com redone: the other site keeps its old row.
    units, diff = rewrite_units(
        tmp_path,
        "no-bots",
        "j3",
        [_reduced_of(raw, "no-bots", ["taobao.com"])],
        [(shard, HOUR, 1)],
        {(shard, HOUR): old.path},
        ["taobao.com"],
        False,
    )
    assert [r["site"] for r in diff.to_pylist()] == ["taobao.com"]
    assert sorted(_file_rows(units[0].path)) == sorted([("taobao.com", 1), (other, 1)])

    # A dry run writes nothing.
    before = sorted(p.name for p in tmp_path.rglob("*.parquet"))
    units, diff = rewrite_units(
        tmp_path,
        "no-bots",
        "j4",
        [_reduced_of(raw, "no-bots")],
        [(shard, HOUR, 1)],
        {(shard, HOUR): old.path},
        None,
        True,
    )
    assert units[0].path == "" and diff.num_rows == 2
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == before


def test_a_logic_that_adds_rows_or_drops_columns_is_refused() -> None:
    from flowray.core import logic

    @logic.register("test-adds-rows")
    def adds(events: pa.Table) -> pa.Table:
        return pa.concat_tables([events, events])

    @logic.register("test-drops-id")
    def drops(events: pa.Table) -> pa.Table:
        return events.drop_columns(["id"])

    raw = pa.Table.from_pylist([{"ts": T0, "site": "taobao.com"}], schema=EVENT_SCHEMA)
    with pytest.raises(ValueError, match="added rows"):
        logic.apply("test-adds-rows", raw)
    with pytest.raises(ValueError, match="dropped a needed column"):
        logic.apply("test-drops-id", raw)
    with pytest.raises(ValueError, match="already registered"):
        logic.register("test-adds-rows")(drops)
    with pytest.raises(ValueError, match="cannot import logic module"):
        logic.get("default", ["no_such_module_here"])
    with pytest.raises(ValueError, match="a logic name"):
        logic.register("bad name!")
