"""Route validated events to their groups, and split them into per-block pieces.

The ingress routes each request's events to the groups that own their sites, and
splits what it sends in one proposal into pieces, so that the group masters, which
are single actors, receive bytes ready to append. A piece holds the events of one
shard whose time falls in one hour: the unit that is later sealed, processed and
published.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flowray.core.invariant import require
from flowray.core.router import ShardMap, shard_for_site
from flowray.core.units import HOUR_MS
from flowray.ingest.events import Events, Row
from flowray.ingest.schema import EVENT_SCHEMA, Routing

_native: types.ModuleType | None
try:  # the C parser and routing pass, built at install where a compiler is found
    from flowray.ingest import _native
except ImportError:  # pragma: no cover - exercised by the numpy path's tests
    _native = None


@dataclass(frozen=True)
class Piece:
    """Events of one (shard, hour), serialized as an Arrow IPC stream (see to_ipc)."""

    shard: int
    hour: int
    events: int
    payload: bytes


_IPC_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the stream's end-of-stream marker
# Pieces of at least this many events travel and are stored with their buffers
# LZ4-compressed: Arrow's own body compression, which every Arrow reader decodes
# (pyarrow.ipc.open_stream as is). A piece of seed-line events shrinks from 52 to 11
# bytes an event, and every byte of a piece is sent to three replicas, written to
# their write-ahead and block files and CRC-checked: on the 2-core reference machine
# batched ingest rose from about 100 to about 134 requests of 10,000 seed lines a
# second. Below 32 events the compressed stream is no smaller (1 event: 1,368
# bytes against 1,104).
COMPRESS_ROWS_MIN = 32
_LZ4 = pa.ipc.IpcWriteOptions(compression="lz4", use_threads=False)
# Decompressing on Arrow's thread pool costs a hand-off per buffer: reading a piece of
# 125 compressed events took 137 µs with threads and 20 µs without on the reference
# machine, and a group's master reads every committed piece for its live counts.
_READ = pa.ipc.IpcReadOptions(use_threads=False)


@functools.lru_cache(maxsize=16)
def _schema_message(schema: pa.Schema) -> bytes:
    return bytes(schema.serialize().to_pybytes())


def to_ipc(table: pa.Table, compress: bool = False) -> bytes:
    """The table as an Arrow IPC stream, its buffers LZ4-compressed if ``compress``.

    Uncompressed: the schema's message (made once per schema), each record batch's
    message, the end marker. A stream writer per call once cost 80 µs for a dozen rows
    on the reference machine, this 20 µs. No dictionary columns."""
    if compress:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=_LZ4) as writer:
            writer.write_table(table)
        return bytes(sink.getvalue().to_pybytes())
    require(
        not any(pa.types.is_dictionary(f.type) for f in table.schema),
        "dictionary columns need dictionary messages",
    )
    parts = [_schema_message(table.schema)]
    parts += [batch.serialize().to_pybytes() for batch in table.to_batches()]
    parts.append(_IPC_END)
    return b"".join(parts)


def from_ipc(payload: bytes) -> pa.Table:
    return conform(pa.ipc.open_stream(payload, options=_READ).read_all())


def conform(table: pa.Table) -> pa.Table:
    """A table of events in EVENT_SCHEMA's columns: a piece written before a field was
    added lacks it, and reads as if every event had left it out (null)."""
    names = EVENT_SCHEMA.names
    if table.schema.names == names:
        return table
    have = set(table.schema.names)
    return pa.table(
        [
            table.column(f.name) if f.name in have else pa.nulls(table.num_rows, f.type)
            for f in EVENT_SCHEMA
        ],
        names=names,
    )


def from_ipc_many(payloads: Sequence[bytes]) -> pa.Table:
    """Payloads written by :func:`to_ipc` with one schema, as one table read as one
    stream: the schema's message, every payload's record batch messages, the end
    marker. Opening a stream per payload cost about 22 µs (a piece of a 100-event
    request holds a dozen events); read together, 10,000 such pieces took 0.09 s
    against 0.23 s on the reference machine. Payloads that are not all streams of the
    first one's schema, with its exact schema message and the end marker, are read one
    by one."""
    require(len(payloads) > 0, "no payloads to read")
    if len(payloads) == 1:
        return from_ipc(payloads[0])
    head = _schema_message(pa.ipc.open_stream(payloads[0], options=_READ).schema)
    if all(p.startswith(head) and p.endswith(_IPC_END) for p in payloads):
        cut, end = len(head), len(_IPC_END)
        joined = b"".join([head, *(memoryview(p)[cut : len(p) - end] for p in payloads), _IPC_END])
        source = pa.BufferReader(joined)
        try:
            table = pa.ipc.open_stream(source, options=_READ).read_all()
        except (pa.ArrowException, OSError):
            table = None  # not all of to_ipc's making after all: one by one says which
        # An end marker inside a payload (two streams in one) ends the joined read early.
        if table is not None and source.tell() == len(joined):
            return conform(table)
    return pa.concat_tables([from_ipc(p) for p in payloads])


@dataclass(frozen=True)
class Routed:
    """Events of one group, ordered by (shard, hour): ``runs`` are (shard, hour,
    offset, rows) over ``table``, each run in arrival order."""

    table: pa.Table
    runs: list[tuple[int, int, int, int]]
    bytes: int  # its share of the buffers it slices, for queue bounds

    @property
    def num_rows(self) -> int:
        return int(self.table.num_rows)


GroupEvents = Routed | list[Row]


@functools.lru_cache(maxsize=64)
def _shard_order(owners: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank of each shard, shard of each rank, owner of each shard): ranks order the
    shards by (owning group, shard), so sorting rows by (rank, hour) puts each group's
    rows together, in (shard, hour) runs."""
    owner = np.asarray(owners, dtype=np.int64)
    shard_of_rank = np.lexsort((np.arange(len(owners)), owner))
    rank = np.empty_like(shard_of_rank)
    rank[shard_of_rank] = np.arange(len(owners))
    return rank, shard_of_rank, owner


def route_table(
    table: pa.Table, shard_map: ShardMap, routing: Routing | None = None
) -> dict[int, Routed]:
    """A table's events by owning group, each group's in (shard, hour) runs.

    Done once per request: one hashing of its distinct sites, one sort and one take.
    A proposal then only slices and encodes (merge_pieces), so a batch of a thousand
    events costs its ingress one pass, not one to route and another to split. A table
    the C parser already gave in this order (``routing``, see :func:`routing_for`)
    costs neither."""
    if table.num_rows == 0:
        return {}
    _rank, shard_of_rank, owner = _shard_order(shard_map.owners)
    if routing is not None and routing.table is table and routing.runs is not None:
        require(routing.ranks == _rank_bytes(shard_map.owners), "rows ordered for another map")
        order, key_runs = None, routing.runs
    elif _native is not None:
        order, key_runs = _native_runs(table, shard_map)
    else:
        order, key_runs = _numpy_runs(table, shard_map)
    in_order = table if order is None else table.take(pa.array(order))
    runs: dict[int, list[tuple[int, int, int, int]]] = {}
    for rank, hour, lo, n in key_runs:
        shard = int(shard_of_rank[rank])
        runs.setdefault(int(owner[shard]), []).append((shard, hour, lo, n))
    out = {}
    size = table.get_total_buffer_size()  # nbytes walks the offsets: 12 µs for 1,000 rows
    for group, group_runs in runs.items():
        first = group_runs[0][2]
        last = group_runs[-1][2] + group_runs[-1][3]
        out[group] = Routed(
            in_order.slice(first, last - first),
            [(shard, hour, lo - first, n) for shard, hour, lo, n in group_runs],
            size * (last - first) // table.num_rows,
        )
    return out


KeyRuns = list[tuple[int, int, int, int]]  # (rank, hour, first row, rows), in order
_HOUR_BITS = 40  # a key is rank << _HOUR_BITS | hour


def _numpy_runs(table: pa.Table, shard_map: ShardMap) -> tuple[np.ndarray | None, KeyRuns]:
    """The rows' stable order by (rank of their shard, hour), None if already in it, and
    the (rank, hour) runs of the ordered rows: numpy's way, where the C one is not built."""
    rank = _shard_order(shard_map.owners)[0]
    keys = (rank[_row_shards(table, shard_map.shard_count)] << _HOUR_BITS) | (
        table.column("ts").to_numpy() // HOUR_MS
    )
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate(([0], starts)).tolist()
    ends = [*starts[1:], len(order)]
    runs = []
    for lo, hi in zip(starts, ends, strict=True):
        key = int(sorted_keys[lo])
        runs.append((key >> _HOUR_BITS, key & ((1 << _HOUR_BITS) - 1), lo, hi - lo))
    return (None if bool(np.all(order[1:] > order[:-1])) else order), runs


def _native_runs(table: pa.Table, shard_map: ShardMap) -> tuple[np.ndarray | None, KeyRuns]:
    """As :func:`_numpy_runs`, by the C routing pass (``_native.group``), with its
    cache of each site's shard: 72 µs against numpy's 254 µs for 1,000 events of 500
    sites, on the reference machine on a slow day."""
    native = _native
    if native is None:
        raise RuntimeError("flowray.ingest._native is not built (no C compiler at install)")
    site = table.column("site").combine_chunks()
    ts = table.column("ts").combine_chunks()
    require(site.type == pa.string() and ts.type == pa.int64(), "an event table's types")
    require(site.null_count == 0 and ts.null_count == 0, "an event without a site or time")
    n = len(site)
    offsets = memoryview(site.buffers()[1])[4 * site.offset : 4 * (site.offset + n + 1)]
    times = memoryview(ts.buffers()[1])[8 * ts.offset : 8 * (ts.offset + n)]
    count = shard_map.shard_count
    args = (offsets, site.buffers()[2] or b"", times, n, count, _rank_bytes(shard_map.owners))
    for _attempt in range(3):
        out = native.group(*args, HOUR_MS)
        if not isinstance(out, list):
            order, runs = out
            return (None if order is None else np.frombuffer(order, dtype=np.int64)), runs
        sites = list(set(out))  # not seen before: hash them, then ask again
        if len(sites) > SHARDS_CACHED_MAX:
            break  # more than the cache may hold
        shards = [shard_for_site(site.decode(), count) for site in sites]
        native.learn(count, sites, shards, SHARDS_CACHED_MAX)
    return _numpy_runs(table, shard_map)  # other threads kept emptying the full cache, or too many


@functools.lru_cache(maxsize=64)
def _rank_bytes(owners: tuple[int, ...]) -> bytes:
    return _shard_order(owners)[0].astype(np.int64).tobytes()


def ordered(table: pa.Table, shard_count: int) -> Routed | None:
    """A table's events, all of one group, in (shard, hour) runs; None if empty."""
    return route_table(table, ShardMap((0,) * shard_count)).get(0)


def routing_for(shard_map: ShardMap) -> Routing | None:
    """What asks the C parser for its rows in ``route_table``'s order for this map (to
    pass in the parse's Limits, then to route), None where it is not built."""
    if _native is None:
        return None
    return Routing(shard_map.shard_count, _rank_bytes(shard_map.owners), HOUR_MS)


def route(
    events: Events, shard_map: ShardMap, routing: Routing | None = None
) -> dict[int, GroupEvents]:
    """The events of each owning group: a table's already in (shard, hour) runs."""
    out: dict[int, GroupEvents] = {}
    if isinstance(events, pa.Table):
        out.update(route_table(events, shard_map, routing))
        return out
    count = shard_map.shard_count
    for row in events:
        group = shard_map.group_of_shard(shard_for_site(row[1], count))
        out.setdefault(group, []).append(row)  # type: ignore[union-attr]
    return out


def merge_pieces(items: list[Routed]) -> list[Piece]:
    """The (shard, hour) pieces of one group's routed events: each run's rows, those of
    one (shard, hour) from several requests together, in the order given."""
    parts: dict[tuple[int, int], list[pa.Table]] = {}
    for item in items:
        for shard, hour, offset, rows in item.runs:
            parts.setdefault((shard, hour), []).append(item.table.slice(offset, rows))
    tables = {
        key: tables[0] if len(tables) == 1 else pa.concat_tables(tables).combine_chunks()
        for key, tables in parts.items()
    }
    big = [key for key, table in tables.items() if table.num_rows >= COMPRESS_ROWS_MIN]
    payloads = dict(zip(big, to_ipc_compressed([tables[key] for key in big]), strict=True))
    return [
        Piece(shard, hour, table.num_rows, payloads.get((shard, hour)) or to_ipc(table))
        for (shard, hour), table in tables.items()
    ]


def to_ipc_compressed(tables: list[pa.Table]) -> list[bytes]:
    """``to_ipc(table, compress=True)`` of each table (one schema), byte for byte, by one
    stream writer: its output cut after each table's record batches, and the schema
    message put in front of each cut. A writer per table cost about 28 µs against 22
    for 125-event pieces on the reference machine."""
    if len(tables) < 2:
        return [to_ipc(table, compress=True) for table in tables]
    sink = pa.BufferOutputStream()
    ends = []
    with pa.ipc.new_stream(sink, tables[0].schema, options=_LZ4) as writer:
        for table in tables:
            writer.write_table(table)
            ends.append(sink.tell())
    stream = memoryview(sink.getvalue())
    head = _schema_message(tables[0].schema)
    require(stream[: len(head)].tobytes() == head, "a stream that does not begin with its schema")
    cuts = [max(end, len(head)) for end in ends]  # the schema goes out with a first batch
    starts = [len(head), *cuts[:-1]]
    return [b"".join((head, stream[a:b], _IPC_END)) for a, b in zip(starts, cuts, strict=True)]


# site -> shard, per shard count: a dict's lookups cost a fifth of an lru_cache call's
# (about 15 against 50 µs for the 500 sites of a 1,000-event batch).
_SHARDS: dict[int, dict[str, int]] = {}
SHARDS_CACHED_MAX = 1 << 18


def _shards_of(sites: list[str], shard_count: int) -> np.ndarray:
    cache = _SHARDS.setdefault(shard_count, {})
    try:
        return np.fromiter(map(cache.__getitem__, sites), dtype=np.int64, count=len(sites))
    except KeyError:
        if len(cache) + len(sites) > SHARDS_CACHED_MAX:
            cache.clear()
        for site in sites:
            if site not in cache:
                cache[site] = shard_for_site(site, shard_count)
        return np.fromiter(map(cache.__getitem__, sites), dtype=np.int64, count=len(sites))


def _row_shards(table: pa.Table, shard_count: int) -> np.ndarray:
    """Each row's shard, hashing each distinct site once."""
    encoded = table.column("site").combine_chunks().dictionary_encode()
    shard_of_value = _shards_of(encoded.dictionary.to_pylist(), shard_count)
    return shard_of_value[encoded.indices.to_numpy(zero_copy_only=False)]  # type: ignore[no-any-return]


def split_pieces(table: pa.Table, shard_count: int) -> list[Piece]:
    """The (shard, hour) pieces of a table, each in arrival order."""
    routed = ordered(table, shard_count)
    return [] if routed is None else merge_pieces([routed])


def split_batch(table: pa.Table, shard_map: ShardMap) -> dict[int, list[Piece]]:
    """Group events by owning group, then by (shard, hour), preserving arrival order."""
    return {g: merge_pieces([r]) for g, r in route_table(table, shard_map).items()}
