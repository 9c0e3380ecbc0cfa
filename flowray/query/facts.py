"""Raw events to the columns insights group by: the one derivation shared by processing
(the map tasks) and live queries, so a live answer and a processed one agree.

Each event gets its minute, its visitor as a 64-bit number, its event name
("pageview" for a page view), whether it is a custom event, and the dimensions that
``flowray.ingest.dimensions`` derives from its path, referrer and User-Agent. Events
that carry none of those fields (seed-form lines, count-only bodies) skip the
derivation: their dimensions are all empty.

Visitors become numbers with DuckDB's ``hash``: counting distinct 64-bit numbers is
several times faster than counting distinct strings. Two different visitor ids of one
site colliding is as likely as for the 64-bit ids themselves (see
flowray.ingest.visitors_id). The hash is DuckDB's, pinned with DuckDB in the lock
files: a DuckDB whose hash differs would count a visitor seen on both sides of the
upgrade twice in a range that spans it, and nothing else.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from flowray.ingest import dimensions
from flowray.query.insights import FACTS_SCHEMA, PAGEVIEW

# The derived columns of each event, besides its site, ts and id.
DERIVED_SCHEMA = pa.schema(
    [
        ("visitor", pa.string()),
        ("name", pa.string()),
        ("path", pa.string()),
        ("source", pa.string()),
        ("utm_medium", pa.string()),
        ("utm_campaign", pa.string()),
        ("browser", pa.string()),
        ("os", pa.string()),
        ("device", pa.string()),
    ]
)
DIMENSION_COLUMNS = ("path", "source", "utm_medium", "utm_campaign", "browser", "os", "device")
_DESCRIBED = ("path", "referrer", "ua")
# What the derivation gives an event without a User-Agent ("" for everything else).
_NO_DEVICE = dimensions.NO_USER_AGENT.device


def derive(events: pa.Table) -> pa.Table:
    """``events`` (site, ts, id and the raw fields) with DERIVED_SCHEMA's columns in place
    of path, referrer, ua, name and props; visitor stays text (see ``hashed``)."""
    rows = events.num_rows
    blank = pa.repeat(pa.scalar("", pa.string()), rows)
    name = pc.fill_null(events.column("name"), PAGEVIEW) if "name" in events.column_names else None
    if name is None:
        name = pa.repeat(pa.scalar(PAGEVIEW, pa.string()), rows)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "visitor": events.column("visitor"),
        "name": name,
    }
    if all(events.column(c).null_count == rows for c in _DESCRIBED):
        columns.update({c: blank for c in DIMENSION_COLUMNS})
        columns["device"] = pa.repeat(pa.scalar(_NO_DEVICE, pa.string()), rows)
    else:
        by_ua = dimensions.parse_user_agents(events.column("ua"))
        by_url = dimensions.sources(
            events.column("referrer"), events.column("path"), events.column("site")
        )
        for c in ("path", "source", "utm_medium", "utm_campaign"):
            columns[c] = by_url.column(c)
        for c in ("browser", "os", "device"):
            columns[c] = by_ua.column(c)
    return pa.table(
        {
            "site": events.column("site"),
            "ts": events.column("ts"),
            "id": events.column("id"),
            **{f.name: columns[f.name] for f in DERIVED_SCHEMA},
        }
    )


# The SQL that turns derived rows (a relation named by the caller) into fact columns.
FACT_SELECT = (
    "site, (ts // 60000) * 60000 AS minute,"
    " CASE WHEN visitor IS NULL OR visitor = '' THEN NULL ELSE hash(visitor) END AS visitor_hash,"
    " name,"
    f" {', '.join(DIMENSION_COLUMNS)},"
    f" (name <> '{PAGEVIEW}')::BIGINT AS is_event"
)


def facts_of(con: duckdb.DuckDBPyConnection, derived: pa.Table) -> pa.Table:
    """Fact rows (FACTS_SCHEMA's columns, minute as epoch ms) of derived events: every
    event counted, ids ignored (live rows are deduplicated before, by the master)."""
    con.register("derived_events", derived)
    try:
        return con.sql(
            f"SELECT site, minute, visitor_hash AS visitor, name, {', '.join(DIMENSION_COLUMNS)},"
            f" count(*)::BIGINT AS count, sum(is_event)::BIGINT AS events"
            f" FROM (SELECT {FACT_SELECT} FROM derived_events)"
            f" GROUP BY ALL"
        ).to_arrow_table()
    finally:
        con.unregister("derived_events")


def live_facts(site: str, found: tuple[list[int], list[int], pa.Table | None]) -> pa.Table:
    """Fact rows (FACTS_SCHEMA) from a master's live answer (LiveCounts.facts): its kept
    raw events derived, and the rest of each minute's count as page views with no
    visitor and no insight fields (the events the master did not keep)."""
    minutes, counts, rich = found
    con = duckdb.connect(config={"threads": 1})
    try:
        parts = []
        kept: dict[int, int] = {}
        if rich is not None and rich.num_rows:
            derived = derive(_with_raw_columns(rich))
            rows = facts_of(con, derived)
            parts.append(rows)
            per_minute = rows.group_by("minute").aggregate([("count", "sum")])
            kept = dict(
                zip(
                    per_minute.column("minute").to_pylist(),
                    per_minute.column("count_sum").to_pylist(),
                    strict=True,
                )
            )
        rest = [(m, c - kept.get(m, 0)) for m, c in zip(minutes, counts, strict=True)]
        rest = [(m, c) for m, c in rest if c > 0]
        if rest:
            parts.append(_plain_rows(rest, site))
        if not parts:
            return FACTS_SCHEMA.empty_table()
        return pa.concat_tables([_as_facts(p) for p in parts if p.num_rows])
    finally:
        con.close()


def _with_raw_columns(rich: pa.Table) -> pa.Table:
    for name in ("id", "path", "referrer", "ua", "visitor", "name"):
        if name not in rich.column_names:
            rich = rich.append_column(name, pa.nulls(rich.num_rows, pa.string()))
    return rich


def _plain_rows(rest: list[tuple[int, int]], site: str) -> pa.Table:
    n = len(rest)
    return pa.table(
        {
            "site": pa.repeat(pa.scalar(site, pa.string()), n),
            "minute": pa.array([m for m, _ in rest], pa.int64()),
            "visitor": pa.nulls(n, pa.uint64()),
            "name": pa.repeat(pa.scalar(PAGEVIEW, pa.string()), n),
            **{
                c: pa.repeat(pa.scalar(_NO_DEVICE if c == "device" else "", pa.string()), n)
                for c in DIMENSION_COLUMNS
            },
            "count": pa.array([c for _, c in rest], pa.int64()),
            "events": pa.repeat(pa.scalar(0, pa.int64()), n),
        }
    )


def _as_facts(rows: pa.Table) -> pa.Table:
    """Rows with FACTS_SCHEMA's columns, in its order and types (minute from epoch ms)."""
    columns = []
    for f in FACTS_SCHEMA:
        column = rows.column(f.name)
        if f.name == "minute" and not pa.types.is_timestamp(column.type):
            column = column.cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
        columns.append(column.cast(f.type))
    return pa.Table.from_arrays(columns, schema=FACTS_SCHEMA)
