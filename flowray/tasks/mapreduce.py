"""Map-reduce over sealed blocks, as pure functions with thin Ray task wrappers.

Map: decode a slice of raw event payloads, apply the processing logic, count events
per (site, minute) — events carrying an id are kept per id so that duplicates can be
dropped later — and rehash every site into one of R reduce keys (the key of its
shard, see ``router.reduce_key_for_shard``). Reduce: merge every map output for one
key, count each (site, id) once, sum per (shard, hour, site, minute), sort, and write
one Parquet file per (shard, hour) unit the key owns — R tasks write in parallel.

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
import pyarrow.parquet as pq
import ray

from flowray.core import logic as logics
from flowray.core.router import reduce_key_for_shard
from flowray.ingest.pieces import from_ipc_many
from flowray.storage.segment import read_payloads
from flowray.warehouse.catalog import DAY_HOURS, Unit
from flowray.warehouse.files import (
    UNIT_SCHEMA,
    merge_day,
    merged_path,
    unit_path,
    write_unit,
)

PARTIAL_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("hour", pa.int64()),
        ("site", pa.string()),
        ("minute", pa.int64()),
        ("id", pa.string()),
        ("c", pa.int64()),
    ]
)

_EMPTY_UNIT = UNIT_SCHEMA.empty_table()
# What reduce makes: final counts per (shard, hour, site, minute).
_EMPTY_REDUCED = pa.schema(
    [
        ("shard", pa.int32()),
        ("hour", pa.int64()),
        ("site", pa.string()),
        ("minute", pa.int64()),
        ("count", pa.int64()),
    ]
).empty_table()


def _duck() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"threads": 1})


DIFF_SCHEMA = pa.schema(
    [
        ("site", pa.string()),
        ("buckets_changed", pa.int64()),
        ("before", pa.int64()),
        ("after", pa.int64()),
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
    """Partial counts of several block slices, split into ``keys`` reduce partitions.

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
        con.register("ev", events)
        partial = con.sql(
            f"SELECT {int(shard)}::INTEGER AS shard, {int(hour)}::BIGINT AS hour, site,"
            " (ts // 60000) * 60000 AS minute, id, count(*)::BIGINT AS c"
            " FROM ev GROUP BY site, minute, id"
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
    """Final counts for one reduce key, sorted by (shard, hour, site, minute)."""
    if not partials:  # units whose parts held nothing to map
        return _EMPTY_REDUCED
    con = _duck()
    con.register("x", pa.concat_tables([p.cast(PARTIAL_SCHEMA) for p in partials]))
    return con.sql(
        "SELECT shard, hour, site, minute, sum(c)::BIGINT AS count FROM ("
        " SELECT shard, hour, site, minute, c FROM x WHERE id IS NULL"
        " UNION ALL"
        " SELECT shard, hour, site, min(minute) AS minute, 1::BIGINT AS c FROM x"
        " WHERE id IS NOT NULL GROUP BY shard, hour, site, id"
        ") GROUP BY shard, hour, site, minute ORDER BY shard, hour, site, minute"
    ).to_arrow_table()


def write_units(
    root: Path,
    logic_name: str,
    job: str,
    reduced: list[pa.Table],
    units: list[tuple[int, int, int]],
) -> list[Unit]:
    """One file per (shard, hour, parts) unit, rows sorted by (site, minute)."""
    con = _duck()
    con.register("r", pa.concat_tables(reduced))
    out = []
    for shard, hour, parts in units:
        rows = con.sql(
            f"SELECT site, make_timestamptz(minute * 1000) AS minute, count FROM r"
            f" WHERE shard = {int(shard)} AND hour = {int(hour)} ORDER BY site, minute"
        ).to_arrow_table()
        path = unit_path(root, logic_name, shard, hour, job)
        write_unit(path, rows)
        events = int(pc.sum(rows.column("count")).as_py() or 0)
        out.append(Unit(shard, hour, str(path), parts, rows.num_rows, events))
    return out


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
    out: list[Unit] = []
    diffs: list[pa.Table] = []
    for shard, hour, parts in units:
        old_path = old_paths.get((shard, hour))
        con.register("old_file", pq.read_table(old_path) if old_path else _EMPTY_UNIT)
        con.execute(
            "CREATE OR REPLACE TEMP VIEW old AS"
            " SELECT site, epoch_ms(minute) AS minute, count FROM old_file"
        )
        con.execute(
            "CREATE OR REPLACE TEMP VIEW new AS SELECT site, minute, count FROM r"
            f" WHERE shard = {int(shard)} AND hour = {int(hour)}"
        )
        diffs.append(
            con.sql(
                "SELECT site, count(*) FILTER (WHERE coalesce(o.count, 0) <> coalesce(n.count, 0))"
                " AS buckets_changed, coalesce(sum(o.count), 0) AS before,"
                " coalesce(sum(n.count), 0) AS after"
                f" FROM (SELECT * FROM old WHERE {redone}) o"
                " FULL OUTER JOIN new n USING (site, minute) GROUP BY site"
            )
            .to_arrow_table()
            .cast(DIFF_SCHEMA)
        )
        rows = con.sql(
            "SELECT site, make_timestamptz(minute * 1000) AS minute, count FROM ("
            f" SELECT site, minute, count FROM old WHERE NOT ({redone})"
            " UNION ALL SELECT site, minute, count FROM new"
            ") ORDER BY site, minute"
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
