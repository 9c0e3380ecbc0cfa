"""Split a validated batch of events into per-group, per-block pieces.

The ingress does this once per request so that the group masters, which are single
actors, receive bytes ready to append. A piece holds the events of one shard whose
time falls in one hour: the unit that is later sealed, processed and published.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flowray.router import ShardMap, shard_for_site

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Piece:
    """Events of one (shard, hour), serialized as an Arrow IPC stream."""

    shard: int
    hour: int
    events: int
    payload: bytes


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


def split_batch(table: pa.Table, shard_map: ShardMap) -> dict[int, list[Piece]]:
    """Group events by owning group, then by (shard, hour), preserving arrival order."""
    if table.num_rows == 0:
        return {}
    encoded = table.column("site").combine_chunks().dictionary_encode()
    sites = encoded.dictionary.to_pylist()
    shard_of_value = np.array(
        [shard_for_site(s, shard_map.shard_count) for s in sites], dtype=np.int64
    )
    shards = shard_of_value[encoded.indices.to_numpy(zero_copy_only=False)]
    hours = table.column("ts").to_numpy() // HOUR_MS
    keys = shards * (1 << 40) + hours
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(order)]))
    out: dict[int, list[Piece]] = {}
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        key = int(sorted_keys[lo])
        shard, hour = key >> 40, key & ((1 << 40) - 1)
        rows = table.take(pa.array(order[lo:hi]))
        piece = Piece(shard, hour, hi - lo, to_ipc(rows))
        out.setdefault(shard_map.group_of_shard(shard), []).append(piece)
    return out


def merge_pieces(pieces: list[Piece]) -> list[Piece]:
    """One piece per (shard, hour): the pieces of several requests become one entry."""
    by_block: dict[tuple[int, int], list[Piece]] = {}
    for piece in pieces:
        by_block.setdefault((piece.shard, piece.hour), []).append(piece)
    out = []
    for (shard, hour), group in by_block.items():
        if len(group) == 1:
            out.append(group[0])
            continue
        table = pa.concat_tables([from_ipc(p.payload) for p in group])
        out.append(Piece(shard, hour, table.num_rows, to_ipc(table)))
    return out
