"""Map-reduce over sealed blocks, as pure functions with thin Ray task wrappers.

Map: decode a slice of raw event payloads, apply the processing logic, count events
per (site, minute) — events carrying an id are kept per id so that duplicates can be
dropped later — and rehash every site into one of R reduce keys. Reduce: merge every
map output for one key, count each (site, id) once, sum per (shard, hour, site,
minute), and sort. Write: one Parquet file per (shard, hour) unit.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from flowray import logic as logics
from flowray.ingest import from_ipc
from flowray.router import reduce_key_for_site
from flowray.storage.catalog import Unit
from flowray.storage.warehouse import unit_path, write_unit

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


def _duck() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"threads": 1})


def map_block_slices(
    blocks: list[tuple[int, int]], payloads: list[list[bytes]], logic_name: str, keys: int
) -> list[pa.Table]:
    """Partial counts of several block slices, split into ``keys`` reduce partitions."""
    logic = logics.get(logic_name)
    partials = []
    con = _duck()
    for (shard, hour), slice_payloads in zip(blocks, payloads, strict=True):
        if not slice_payloads:
            continue
        events = pa.concat_tables([from_ipc(p) for p in slice_payloads])
        events = logic(events)
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
    encoded = table.column("site").combine_chunks().dictionary_encode()
    key_of_value = np.array(
        [reduce_key_for_site(s, keys) for s in encoded.dictionary.to_pylist()], dtype=np.int64
    )
    row_keys = key_of_value[encoded.indices.to_numpy(zero_copy_only=False)]
    return [table.filter(pa.array(row_keys == k)) for k in range(keys)]


def reduce_partials(partials: list[pa.Table]) -> pa.Table:
    """Final counts for one reduce key, sorted by (shard, hour, site, minute)."""
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


@ray.remote(num_cpus=1, max_retries=3)
def map_task(
    blocks: list[tuple[int, int]], logic_name: str, keys: int, *payloads: list[bytes]
) -> tuple[pa.Table, ...] | pa.Table:
    out = map_block_slices(blocks, list(payloads), logic_name, keys)
    return out[0] if keys == 1 else tuple(out)


@ray.remote(num_cpus=1, max_retries=3)
def reduce_task(*partials: pa.Table) -> pa.Table:
    return reduce_partials(list(partials))


@ray.remote(num_cpus=1, max_retries=3)
def write_task(
    root: str, logic_name: str, job: str, units: list[tuple[int, int, int]], *reduced: pa.Table
) -> list[Unit]:
    return write_units(Path(root), logic_name, job, list(reduced), units)
