"""Map-reduce over sealed blocks, as pure functions with thin Ray task wrappers.

Map: decode a slice of raw event payloads, apply the processing logic, count events
per (site, minute, visitor, dimensions) — events carrying an id are kept per id so
that duplicates can be dropped later — and rehash every site into one of R reduce
keys (the key of its shard, see ``router.reduce_key_for_shard``). Reduce: merge every
map output for one key, count each (site, id) once, sort and sum equal rows, and
write one Parquet file per (shard, hour) unit the key owns — R tasks write in
parallel.

Re-processing uses the same map and reduce (with the run's logic, and optionally only
some sites) and then *rewrites* each unit: the sites re-processed take their new
rows, the others keep the rows of the unit being replaced, and a per-site diff
(buckets changed, totals before and after) is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from flowray.core import logic as logics
from flowray.core.router import reduce_key_for_shard
from flowray.ingest.pieces import from_ipc_many
from flowray.query import facts
from flowray.query.facts import DIMENSION_COLUMNS
from flowray.storage.segment import read_payloads
from flowray.warehouse.catalog import DAY_HOURS, Unit
from flowray.warehouse.files import (
    UNIT_COLUMNS,
    merge_day,
    merged_path,
    read_unit,
    unit_path,
    write_unit,
)

_DIM_NAMES = ("name", *DIMENSION_COLUMNS)
_DIMS = ", ".join(_DIM_NAMES)
# A fact's visitor, name and dimensions as one number (DuckDB's hash, as for visitors):
# what the rows of one (site, minute) are ordered by, in every unit file.
_ROW_HASH = f"hash(visitor, {_DIMS})"
# What a map makes: facts per (shard, hour, site, minute, id, visitor, name, dimensions),
# an event with an id alone in its row so that reduce can count it once; dh is
# _ROW_HASH.
PARTIAL_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("hour", pa.int64()),
        ("site", pa.string()),
        ("minute", pa.int64()),
        ("id", pa.string()),
        ("visitor", pa.uint64()),
        ("name", pa.string()),
        *((c, pa.string()) for c in DIMENSION_COLUMNS),
        ("dh", pa.uint64()),
        ("c", pa.int64()),
        ("e", pa.int64()),
    ]
)

# What reduce makes: final facts per (shard, hour, site, minute, visitor, dimensions).
_EMPTY_REDUCED = pa.schema(
    [
        ("shard", pa.int32()),
        ("hour", pa.int64()),
        ("site", pa.string()),
        ("minute", pa.int64()),
        ("visitor", pa.uint64()),
        ("name", pa.string()),
        *((c, pa.string()) for c in DIMENSION_COLUMNS),
        ("count", pa.int64()),
        ("events", pa.int64()),
    ]
).empty_table()


# A map's fact rows of the events registered as "ev". Events without a visitor (count-
# only bodies, seed lines) are summed per (site, minute, id, name, dimensions): they
# collapse to a few rows a minute. An event with a visitor is nearly always alone in
# its row (one visitor, one minute), so grouping those would cost a hash of every row
# for almost no fewer rows; each goes out as it is, and reduce sums any repeats.
_MAP_ROWS = (
    f"SELECT site, minute, id, visitor_hash AS visitor, {_DIMS}, count(*)::BIGINT AS c,"
    " sum(is_event)::BIGINT AS e"
    f" FROM (SELECT {facts.FACT_SELECT}, id FROM ev) WHERE visitor_hash IS NULL"
    f" GROUP BY site, minute, id, visitor_hash, {_DIMS}"
    " UNION ALL"
    f" SELECT site, minute, id, visitor_hash AS visitor, {_DIMS}, 1::BIGINT AS c,"
    " is_event AS e"
    f" FROM (SELECT {facts.FACT_SELECT}, id FROM ev) WHERE visitor_hash IS NOT NULL"
)


def _duck() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"threads": 1})


# A re-processing run's change per site: buckets (minutes) whose events changed, and
# the events, custom events and visitors before and after (visitors as the sum of
# each hour's distinct visitors: a change in who visited shows, however counted).
DIFF_SCHEMA = pa.schema(
    [
        ("site", pa.string()),
        ("buckets_changed", pa.int64()),
        ("before", pa.int64()),
        ("after", pa.int64()),
        ("custom_before", pa.int64()),
        ("custom_after", pa.int64()),
        ("visitors_before", pa.int64()),
        ("visitors_after", pa.int64()),
    ]
)


def map_block_slices(
    blocks: list[tuple[int, int]],
    payloads: list[list[bytes]],
    logic_name: str,
    keys: int,
    modules: tuple[str, ...] = (),
    sites: list[str] | None = None,
) -> list[pa.Table]:
    """Partial facts of several block slices, split into ``keys`` reduce partitions.

    With ``sites``, only those sites' events are counted (re-processing some sites).
    """
    logics.get(logic_name, modules)  # an unknown logic fails before any work
    only = None if sites is None else pa.array(sites, type=pa.string())
    partials = []
    con = _duck()
    for (shard, hour), slice_payloads in zip(blocks, payloads, strict=True):
        if not slice_payloads:
            continue
        events = from_ipc_many(slice_payloads)
        if only is not None:
            events = events.filter(pc.is_in(events.column("site"), value_set=only))
        events = logics.apply(logic_name, events, modules)
        con.register("ev", facts.derive(events))
        partial = con.sql(
            f"SELECT {int(shard)}::INTEGER AS shard, {int(hour)}::BIGINT AS hour, site, minute,"
            f" id, visitor, {_DIMS}, {_ROW_HASH} AS dh, c, e FROM ({_MAP_ROWS})"
        ).to_arrow_table()
        con.unregister("ev")
        partials.append(partial.cast(PARTIAL_SCHEMA))
    if not partials:
        return [PARTIAL_SCHEMA.empty_table() for _ in range(keys)]
    table = pa.concat_tables(partials)
    shards = table.column("shard").to_numpy()
    row_keys = np.array([reduce_key_for_shard(int(x), keys) for x in range(int(shards.max()) + 1)])
    row_keys = row_keys[shards]
    return [table.filter(pa.array(row_keys == k)) for k in range(keys)]


def reduce_partials(partials: list[pa.Table]) -> pa.Table:
    """Final facts for one reduce key, sorted by (shard, hour) and then in the units'
    order (site, minute, rows without a visitor last, the hash of visitor, name and
    dimensions: the same in every run, so files come out the same): an event with an
    id counts once per (shard, hour, site), in the first of its rows by minute (then
    by its other columns, so every run picks the same)."""
    if not partials:  # units whose parts held nothing to map
        return _EMPTY_REDUCED
    table = pa.concat_tables([p.cast(PARTIAL_SCHEMA) for p in partials])
    columns = [n for n in PARTIAL_SCHEMA.names if n != "id"]
    with_id = pc.is_valid(table.column("id"))
    if pc.any(with_id).as_py():
        con = _duck()
        con.register("x", table.filter(with_id))
        keys = f"shard, hour, site, minute, visitor, {_DIMS}, dh"
        once = con.sql(
            f"SELECT {keys}, 1::BIGINT AS c, (e > 0)::BIGINT AS e FROM ("
            f" SELECT *, row_number() OVER (PARTITION BY shard, hour, site, id"
            f"  ORDER BY minute, visitor, {_DIMS}) AS n FROM x"
            ") WHERE n = 1"
        ).to_arrow_table()
        plain = table.filter(pc.invert(with_id)).select(columns)
        table = pa.concat_tables([plain, once.cast(plain.schema)])
    return _sum_equal_rows(table.select(columns))


def _sum_equal_rows(table: pa.Table) -> pa.Table:
    """One row per (shard, hour, site, minute, visitor, name and dimensions) with the
    counts summed, in the units' order. Sorting numbers (the site's rank among the
    sites, the row hash) and then gathering the rows moves each text once, where an
    SQL GROUP BY and ORDER BY carry eight text columns through both."""
    if table.num_rows == 0:
        return _EMPTY_REDUCED
    site = table.column("site").combine_chunks()
    encoded = pc.dictionary_encode(site)
    ranks = pc.rank(encoded.dictionary, sort_keys="ascending", tiebreaker="dense")
    leading = [  # the keys before the row hash, most significant first
        table.column("shard").to_numpy(),
        table.column("hour").to_numpy(),
        ranks.to_numpy()[encoded.indices.to_numpy()],
        table.column("minute").to_numpy(),
        pc.is_null(table.column("visitor")).to_numpy(),
    ]
    packed = _packed(leading)
    keys = [packed] if packed is not None else leading
    keys.append(table.column("dh").to_numpy())
    names = [f"k{i}" for i in range(len(keys))]
    order = pc.sort_indices(
        pa.table(dict(zip(names, keys, strict=True))), sort_keys=[(n, "ascending") for n in names]
    ).to_numpy()
    new_row = np.zeros(len(order), dtype=bool)
    new_row[0] = True
    for key in keys:
        sorted_key = key[order]
        new_row[1:] |= sorted_key[1:] != sorted_key[:-1]
    if _hashes_collide(table, order, new_row):
        return _sum_equal_rows_by_sql(table)
    starts = np.flatnonzero(new_row)
    count = np.add.reduceat(table.column("c").to_numpy()[order], starts)
    events = np.add.reduceat(table.column("e").to_numpy()[order], starts)
    first = table.take(pa.array(order[starts]))
    return pa.Table.from_arrays(
        [first.column(n) for n in _EMPTY_REDUCED.schema.names[:-2]]
        + [pa.array(count, pa.int64()), pa.array(events, pa.int64())],
        schema=_EMPTY_REDUCED.schema,
    )


def _packed(keys: list[np.ndarray]) -> np.ndarray | None:
    """The keys (integers or booleans, most significant first) as one int64 that sorts
    the same, when their ranges fit in 63 bits; else None. Fewer keys to sort by: the
    sort's cost grows with each."""
    out = np.zeros(len(keys[0]), dtype=np.int64)
    span = 1
    for key in keys:
        low = int(key.min())
        width = int(key.max()) - low + 1
        span *= width
        if span >= 2**63:
            return None
        out *= width
        out += (key - low).astype(np.int64)
    return out


def _hashes_collide(table: pa.Table, order: np.ndarray, new_row: np.ndarray) -> bool:
    """Whether two rows about to be summed differ in visitor, name or dimensions: their
    64-bit hashes collided. Only those rows are compared."""
    joined = np.flatnonzero(~new_row)
    if not len(joined):
        return False
    left, right = pa.array(order[joined - 1]), pa.array(order[joined])
    for name in ("visitor", *_DIM_NAMES):
        a, b = table.column(name).take(left), table.column(name).take(right)
        same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))
        if not pc.all(same).as_py():
            return True
    return False


def _sum_equal_rows_by_sql(table: pa.Table) -> pa.Table:
    """What _sum_equal_rows gives, by SQL, for the tables where two row hashes collide:
    the visitor and the text break the tie."""
    con = _duck()
    con.register("x", table)
    keys = f"shard, hour, site, minute, visitor, {_DIMS}"
    return con.sql(
        f"SELECT {keys}, sum(c)::BIGINT AS count, sum(e)::BIGINT AS events FROM x"
        f" GROUP BY {keys}, dh"
        f" ORDER BY shard, hour, site, minute, visitor IS NULL, dh, visitor, {_DIMS}"
    ).to_arrow_table()


# A unit file's columns, from reduce's output (minute in epoch ms there).
_UNIT_SELECT = f"site, make_timestamptz(minute * 1000) AS minute, {', '.join(UNIT_COLUMNS[2:])}"
_UNIT_ORDER = f"site, minute, visitor IS NULL, {_ROW_HASH}, visitor, {_DIMS}"


def write_units(
    root: Path,
    logic_name: str,
    job: str,
    reduced: list[pa.Table],
    units: list[tuple[int, int, int]],
) -> list[Unit]:
    """One file per (shard, hour, parts) unit, rows sorted by (site, minute).

    Each reduced table is sorted already (reduce_partials), so a unit's rows are one
    run of it, sliced out rather than selected and sorted again per unit."""
    runs: dict[tuple[int, int], pa.Table] = {}
    for table in reduced:
        runs.update(_unit_runs(table))
    out = []
    for shard, hour, parts in units:
        rows = _unit_rows(runs.get((shard, hour), _EMPTY_REDUCED))
        path = unit_path(root, logic_name, shard, hour, job)
        write_unit(path, rows)
        events = int(pc.sum(rows.column("count")).as_py() or 0)
        out.append(Unit(shard, hour, str(path), parts, rows.num_rows, events))
    return out


def _unit_runs(table: pa.Table) -> dict[tuple[int, int], pa.Table]:
    """The rows of each (shard, hour) of a table sorted by them, as zero-copy slices."""
    if table.num_rows == 0:
        return {}
    shards = table.column("shard").to_numpy().astype(np.int64)
    hours = table.column("hour").to_numpy()
    changes = np.flatnonzero((np.diff(shards) != 0) | (np.diff(hours) != 0)) + 1
    starts = [0, *changes.tolist()]
    ends = [*changes.tolist(), table.num_rows]
    return {
        (int(shards[a]), int(hours[a])): table.slice(a, b - a)
        for a, b in zip(starts, ends, strict=True)
    }


def _unit_rows(run: pa.Table) -> pa.Table:
    """A unit file's columns from reduce's rows (minute from epoch ms)."""
    minute = run.column("minute").cast(pa.timestamp("ms", tz="UTC"))
    return run.select(list(UNIT_COLUMNS)).set_column(1, "minute", minute)


# Per site, of one unit: what changed, old rows (o) against new (n) per minute.
_DIFF_SQL = """
WITH o AS (SELECT * FROM old WHERE {redone}),
om AS (SELECT site, minute, sum(count) AS c, sum(events) AS e FROM o GROUP BY ALL),
nm AS (SELECT site, minute, sum(count) AS c, sum(events) AS e FROM new GROUP BY ALL),
ov AS (SELECT site, count(DISTINCT visitor) AS v FROM o GROUP BY site),
nv AS (SELECT site, count(DISTINCT visitor) AS v FROM new GROUP BY site)
SELECT site,
  count(*) FILTER (WHERE coalesce(om.c, 0) <> coalesce(nm.c, 0)
                      OR coalesce(om.e, 0) <> coalesce(nm.e, 0)) AS buckets_changed,
  coalesce(sum(om.c), 0) AS before, coalesce(sum(nm.c), 0) AS after,
  coalesce(sum(om.e), 0) AS custom_before, coalesce(sum(nm.e), 0) AS custom_after,
  coalesce(any_value(ov.v), 0) AS visitors_before, coalesce(any_value(nv.v), 0) AS visitors_after
FROM om FULL OUTER JOIN nm USING (site, minute)
LEFT JOIN ov USING (site) LEFT JOIN nv USING (site)
GROUP BY site
"""


def rewrite_units(
    root: Path,
    logic_name: str,
    job: str,
    reduced: list[pa.Table],
    units: list[tuple[int, int, int]],
    old_paths: dict[tuple[int, int], str],
    sites: list[str] | None,
    dry_run: bool,
) -> tuple[list[Unit], pa.Table]:
    """Re-processed units, merged with the units they replace, and the per-site diff.

    ``old_paths`` maps (shard, hour) to the replaced unit's file. Without ``sites``
    every site takes its new rows; with it, only those sites do. In a dry run nothing
    is written and the units returned have no path.
    """
    con = _duck()
    con.register("r", pa.concat_tables(reduced))
    con.register("sel", pa.table({"site": pa.array(sites or [], type=pa.string())}))
    redone = "TRUE" if sites is None else "site IN (SELECT site FROM sel)"
    columns = ", ".join(UNIT_COLUMNS)
    out: list[Unit] = []
    diffs: list[pa.Table] = []
    for shard, hour, parts in units:
        old_path = old_paths.get((shard, hour))
        con.register("old_file", read_unit(old_path))
        con.execute(
            "CREATE OR REPLACE TEMP VIEW old AS"
            " SELECT * REPLACE (epoch_ms(minute) AS minute) FROM old_file"
        )
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW new AS SELECT {columns} FROM r"
            f" WHERE shard = {int(shard)} AND hour = {int(hour)}"
        )
        diff = con.sql(_DIFF_SQL.format(redone=redone)).to_arrow_table()
        diffs.append(diff.select(DIFF_SCHEMA.names).cast(DIFF_SCHEMA))
        rows = con.sql(
            f"SELECT {_UNIT_SELECT} FROM ("
            f" SELECT {columns} FROM old WHERE NOT ({redone})"
            f" UNION ALL SELECT {columns} FROM new"
            f") ORDER BY {_UNIT_ORDER}"
        ).to_arrow_table()
        events = int(pc.sum(rows.column("count")).as_py() or 0)
        path = "" if dry_run else str(unit_path(root, logic_name, shard, hour, job))
        if not dry_run:
            write_unit(Path(path), rows)
        out.append(Unit(shard, hour, path, parts, rows.num_rows, events))
    diff = pa.concat_tables(diffs) if diffs else DIFF_SCHEMA.empty_table()
    return out, diff


# Processing is batch work beside the write path: its tasks run in worker processes of
# their own (a runtime environment of their own keeps Ray from handing such a worker
# to an actor later) at a lower CPU priority, so an hour's processing does not stretch
# acknowledgements or elections while it runs (BENCHMARKS.md).
BATCH_ENV = "FLOWRAY_BATCH_WORKER"
BATCH_NICENESS = 10
BATCH_RUNTIME_ENV = {"env_vars": {BATCH_ENV: "1"}}


_niced = False


def _as_batch_work() -> None:
    """Lower this worker's priority by BATCH_NICENESS, once (only in batch workers):
    relative to what Ray gave its workers, so below the actors whatever that is."""
    global _niced
    if not _niced and os.environ.get(BATCH_ENV) == "1":
        os.nice(BATCH_NICENESS)
        _niced = True


@ray.remote(num_cpus=1, max_retries=3, runtime_env=BATCH_RUNTIME_ENV)
def worker_niceness() -> int:
    """The niceness a processing task runs at (for tests and operators)."""
    _as_batch_work()
    return os.nice(0)


@ray.remote(num_cpus=1, max_retries=3, runtime_env=BATCH_RUNTIME_ENV)
def map_task(
    blocks: list[tuple[int, int]],
    logic_name: str,
    keys: int,
    modules: tuple[str, ...],
    sites: list[str] | None,
    reads: list[tuple[str, np.ndarray]],
) -> tuple[pa.Table, ...] | pa.Table:
    """Map slices read straight from a replica's block files (the task runs on that
    replica's node): ``reads`` holds each slice's file and (offset, length) rows."""
    _as_batch_work()
    payloads = [read_payloads(Path(path), refs) for path, refs in reads]
    out = map_block_slices(blocks, payloads, logic_name, keys, modules, sites)
    return out[0] if keys == 1 else tuple(out)


@ray.remote(num_cpus=1, max_retries=3, runtime_env=BATCH_RUNTIME_ENV)
def reduce_write_task(
    root: str,
    logic_name: str,
    job: str,
    units: list[tuple[int, int, int]],
    *partials: pa.Table,
) -> list[Unit]:
    """Reduce one key's partials and write the units it owns."""
    _as_batch_work()
    reduced = reduce_partials(list(partials))
    return write_units(Path(root), logic_name, job, [reduced], units)


@ray.remote(num_cpus=1, max_retries=3, runtime_env=BATCH_RUNTIME_ENV)
def reduce_rewrite_task(
    root: str,
    logic_name: str,
    job: str,
    units: list[tuple[int, int, int]],
    old_paths: dict[tuple[int, int], str],
    sites: list[str] | None,
    dry_run: bool,
    *partials: pa.Table,
) -> tuple[list[Unit], pa.Table]:
    """Reduce one key's partials and rewrite the units it owns (re-processing)."""
    _as_batch_work()
    reduced = reduce_partials(list(partials))
    return rewrite_units(Path(root), logic_name, job, [reduced], units, old_paths, sites, dry_run)


@ray.remote(num_cpus=1, max_retries=3, runtime_env=BATCH_RUNTIME_ENV)
def merge_task(
    root: str, logic_name: str, shard: int, day: int, job: str, paths: list[str]
) -> Unit:
    """One shard's day in one file (compaction); the Unit's hour is the day's first."""
    _as_batch_work()
    out = merged_path(Path(root), logic_name, shard, day, job)
    rows, events = merge_day(paths, out)
    return Unit(shard, day * DAY_HOURS, str(out), 0, rows, events)
