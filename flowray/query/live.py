"""Live counts: per (site, minute) counts of committed events not yet in the warehouse.

A group's master keeps them so a query sees traffic seconds after it is acknowledged,
long before its hour is processed. They follow the processing rules exactly — the
default logic, and an event with an id counted once per (site, id) within its (shard,
hour) — so when a block is published its counts equal what the live counts said, and
the block's live counts are then dropped. Pure: the master feeds it committed blocks
and publication cursors.
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowray.core.invariant import require
from flowray.core.units import HOUR_MS, MINUTE_MS
from flowray.ingest.pieces import from_ipc, from_ipc_many, to_ipc
from flowray.storage.replica_log import BlockKey

_native: types.ModuleType | None
try:
    from flowray.ingest import _native
except ImportError:  # not built: (site, id) pairs in a Python set, slower and larger
    _native = None


# A (site, minute) key: the site's code in the high 32 bits, the minute number (epoch
# ms // 60,000, below 2**32 until the year 10136) in the low 32.
MINUTE_BITS = 32
MINUTE_MASK = (1 << MINUTE_BITS) - 1
TAIL_KEYS_MAX = 1 << 16  # keys added since the last merge, at most
# A batch is counted on a dense (site, minute) grid when it has at most this many
# cells per row (plus a few): beyond, the grid costs more than sorting the keys.
DENSE_CELLS_PER_ROW = 4


class _Block:
    """One block's counts: (site, minute) keys in a sorted numpy array with their counts,
    plus a short tail of recent additions, merged in when it grows.

    About 16 bytes per (site, minute), in a few large arrays that go back to the
    system when the block is published; dicts of dicts took over 100 bytes per
    (site, minute) and left the heap fragmented (see BENCHMARKS.md, memory).
    """

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.tail_keys: list[np.ndarray] = []
        self.tail_counts: list[np.ndarray] = []
        self.tail_len = 0
        self.seal_index = 0  # 0 while open
        # The committed payloads (Arrow IPC, as replicated) that hold events with insight
        # fields (a visitor, path, referrer, User-Agent or event name), for live visitors
        # and breakdowns, decoded only when a query asks; events without any are in the
        # counts alone, and so are those past the master's memory bound.
        self.rich: list[bytes] = []
        self.rich_bytes = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.tail_keys.append(keys)
        self.tail_counts.append(counts)
        self.tail_len += len(keys)
        if self.tail_len > TAIL_KEYS_MAX:
            self._merge()

    def _merge(self) -> None:
        keys = np.concatenate([self.keys, *self.tail_keys])
        counts = np.concatenate([self.counts, *self.tail_counts])
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts, minlength=len(self.keys)).astype(
            np.int64
        )
        self.tail_keys, self.tail_counts, self.tail_len = [], [], 0

    def site(self, code: int, lo_minute: int, hi_minute: int) -> tuple[np.ndarray, np.ndarray]:
        """(minute numbers, counts) of one site in [lo, hi), unmerged: a minute may repeat."""
        lo, hi = (code << MINUTE_BITS) | lo_minute, (code << MINUTE_BITS) | hi_minute
        a, b = np.searchsorted(self.keys, [lo, hi])
        keys, counts = [self.keys[a:b]], [self.counts[a:b]]
        for tail_keys, tail_counts in zip(self.tail_keys, self.tail_counts, strict=True):
            hit = (tail_keys >= lo) & (tail_keys < hi)
            keys.append(tail_keys[hit])
            counts.append(tail_counts[hit])
        return np.concatenate(keys) & MINUTE_MASK, np.concatenate(counts)


def _is_text(kind: pa.DataType) -> bool:
    """A column of strings: ids and sites of other types (5 against "5") are refused."""
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


class SeenIds:
    """The (site, id) pairs of one (shard, hour) counted so far: an event whose pair is
    here is a duplicate. In C (``_native.first_seen``) a pair costs a 16-byte slot at a
    load of at most 0.7 (23-46 bytes a pair; a cluster's memory grew 34 B an event with
    an id) and about 60 ns, plus about 150 ns for the table's growth on the reference
    VM; a Python set of (site, id) tuples, the fallback when the extension is not
    built, took 267 bytes and 0.7 us an event (most of a master's counting time for
    events with ids)."""

    def __init__(self) -> None:
        self._table = _native.seen_new() if _native is not None else None
        self._pairs: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        if self._table is not None:
            return int(_native.seen_size(self._table)[0]) if _native is not None else 0
        return len(self._pairs)

    def first(self, sites: pa.Array, ids: pa.Array) -> np.ndarray:
        """Add each row's (site, id); True where the row counts: its id is null, or the
        pair was not here nor earlier in these rows. Sites must not be null."""
        require(len(sites) == len(ids), "sites and ids of different lengths")
        if not (_is_text(sites.type) and (_is_text(ids.type) or pa.types.is_null(ids.type))):
            raise TypeError(f"sites of {sites.type} and ids of {ids.type}: strings expected")
        if self._table is not None and _native is not None:
            # One kind of string (int32 offsets), or a pair added as one kind would not
            # be found as the other.
            sites, ids = sites.cast(pa.string()), ids.cast(pa.string())
            _valid, site_offsets, site_data = sites.buffers()
            id_valid, id_offsets, id_data = ids.buffers()
            empty = b""
            keep = _native.first_seen(
                self._table,
                len(sites),
                site_offsets,
                site_data if site_data is not None else empty,
                sites.offset,
                id_offsets,
                id_data if id_data is not None else empty,
                id_valid if ids.null_count else None,
                ids.offset,
            )
            return np.frombuffer(keep, dtype=bool)
        seen, keep_list = self._pairs, []
        for site, event_id in zip(sites.to_pylist(), ids.to_pylist(), strict=True):
            if event_id is None:
                keep_list.append(True)
            elif (site, event_id) in seen:
                keep_list.append(False)
            else:
                seen.add((site, event_id))
                keep_list.append(True)
        return np.array(keep_list, dtype=bool)


# The raw columns live facts answer with: what flowray.query.facts derives facts from.
RICH_COLUMNS = ("site", "ts", "path", "referrer", "ua", "visitor", "name")
_INSIGHT_FIELDS = ("path", "referrer", "ua", "visitor", "name")
RICH_BYTES_MAX = 256 * 1024 * 1024


class LiveCounts:
    def __init__(self, rich_bytes_max: int = RICH_BYTES_MAX) -> None:
        self.rich_bytes_max = rich_bytes_max
        self.rich_bytes = 0
        self.blocks: dict[BlockKey, _Block] = {}
        # Published blocks stay one more publication, for readers whose catalog
        # snapshot predates the publish: they must not see the block in neither place.
        self.retired: dict[BlockKey, _Block] = {}
        # (site, id) already counted, per (shard, hour): duplicates count once.
        self.seen_ids: dict[tuple[int, int], SeenIds] = defaultdict(SeenIds)
        self.published_upto = 0
        # Every site seen since this master began, numbered: ~100 bytes per site.
        self.codes: dict[str, int] = {}
        self.rich_dropped = 0  # events past the memory bound: counted, not kept

    def apply(self, key: BlockKey, events: pa.Table, payloads: list[bytes] | None = None) -> None:
        """Count one committed batch of events of block ``key`` (decoded from
        ``payloads``, when given: they are kept as they are if the batch has insight
        fields). A batch it cannot count (a column missing or of another type) raises
        before anything changes."""
        ids, site_column, ts = events.column("id"), events.column("site"), events.column("ts")
        if site_column.null_count or ts.null_count:  # IPC does not enforce "not null"
            raise ValueError("a committed batch with a missing site or time")
        if not (
            pa.types.is_integer(ts.type)
            and _is_text(site_column.type)
            and (_is_text(ids.type) or pa.types.is_null(ids.type))
        ):
            raise TypeError(
                f"a committed batch of other types: ts {ts.type}, site {site_column.type}, "
                f"id {ids.type}"
            )
        minutes = ts.cast(pa.int64()).to_numpy() // MINUTE_MS  # a safe cast: may raise
        if len(minutes) and (minutes.min() < 0 or minutes.max() > MINUTE_MASK):
            raise ValueError("a committed batch with a time out of range")
        if ids.null_count < len(ids):
            mask = self.seen_ids[(key[0], key[1])].first(
                site_column.combine_chunks(), ids.combine_chunks()
            )
            if not mask.all():
                site_column, minutes = site_column.filter(pa.array(mask)), minutes[mask]
        if len(minutes) == 0:
            return
        block = self.blocks.get(key)
        if block is None:
            block = self.blocks[key] = _Block()
        self._keep_rich(block, events, payloads)
        # Counted with numpy on (site code, minute number) keys: Arrow's group_by has a
        # large fixed cost per call, and this runs for every committed entry.
        encoded = site_column.combine_chunks().dictionary_encode()
        names = encoded.dictionary.to_pylist()
        codes = self.codes
        try:  # sites seen before: the usual case, a third faster than setdefault's loop
            code_of_value = np.fromiter(map(codes.__getitem__, names), np.int64, len(names))
        except KeyError:
            code_of_value = np.array(
                [codes.setdefault(name, len(codes)) for name in names], dtype=np.int64
            )
        values = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        first = int(minutes.min())
        span = int(minutes.max()) - first + 1
        if len(code_of_value) * span <= DENSE_CELLS_PER_ROW * len(values) + 256:
            # A batch spans a minute or two: count (site, minute) cells with one
            # bincount over a dense grid instead of sorting the keys (np.unique).
            cells = np.bincount(values * span + (minutes - first))
            used = np.flatnonzero(cells)
            keys = (code_of_value[used // span] << MINUTE_BITS) | (used % span + first)
            counts = cells[used]
        else:
            keys, counts = np.unique(
                (code_of_value[values] << MINUTE_BITS) | minutes, return_counts=True
            )
        block.add(keys, counts.astype(np.int64))

    def _keep_rich(self, block: _Block, events: pa.Table, payloads: list[bytes] | None) -> None:
        """Keep a batch that carries insight fields, within the memory bound: its payloads
        as committed (no work beyond a look at each column's null count), or for a batch
        given as a table, that table serialized. Duplicates of ids are in them: the reader
        keeps the first of each (site, id), as the counts do."""
        if self.rich_bytes >= self.rich_bytes_max:
            return  # full: not even looked at
        rows = events.num_rows
        present = [c for c in _INSIGHT_FIELDS if c in events.column_names]
        if all(events.column(c).null_count == rows for c in present):
            return  # count-only traffic: nothing to keep
        kept = payloads if payloads is not None else [to_ipc(events, compress=True)]
        size = sum(len(p) for p in kept)
        if self.rich_bytes + size > self.rich_bytes_max:
            self.rich_dropped += rows
            return
        block.rich.extend(kept)
        block.rich_bytes += size
        self.rich_bytes += size

    def apply_payloads(self, key: BlockKey, payloads: Iterable[bytes]) -> list[str]:
        """Count committed payloads (Arrow IPC streams, in commit order) of block ``key``
        in one go; returns why each payload that does not decode was skipped.

        Read as one stream (``from_ipc_many``) and counted once: on the 2-core
        reference machine counting cost about 120 µs per call whatever its size (a
        master's pieces hold about 125 events), so a master counting piece by piece
        spent more on it than on replicating them. A batch that does not count as a
        whole (a payload with another schema, or a null site) is counted payload by
        payload, skipping only the bad ones.
        """
        payloads = list(payloads)
        if len(payloads) > 1:
            try:  # one stream, one count: the usual case
                self.apply(key, from_ipc_many(payloads), payloads)
                return []
            except (pa.ArrowException, OSError, KeyError, ValueError, TypeError):
                pass  # apply changes nothing before it raises: count them one by one
        errors: list[str] = []
        tables, good = [], []
        for payload in payloads:
            try:
                tables.append(from_ipc(payload))
                good.append(payload)
            except (pa.ArrowException, OSError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        if not tables:
            return errors
        try:
            self.apply(key, tables[0] if len(tables) == 1 else pa.concat_tables(tables), good)
        except (pa.ArrowException, KeyError, ValueError, TypeError) as exc:
            if len(tables) == 1:
                return [*errors, f"{type(exc).__name__}: {exc}"]
            for table, payload in zip(tables, good, strict=True):  # apply changes nothing
                try:  # before it raises (see apply)
                    self.apply(key, table, [payload])
                except (pa.ArrowException, KeyError, ValueError, TypeError) as one:
                    errors.append(f"{type(one).__name__}: {one}")
        return errors

    def sealed(self, key: BlockKey, seal_index: int) -> None:
        if key in self.blocks:
            self.blocks[key].seal_index = seal_index

    def published(self, upto_seal_index: int) -> None:
        """Blocks sealed at or before ``upto_seal_index`` are in the warehouse: drop them."""
        if upto_seal_index <= self.published_upto:
            return
        self.published_upto = upto_seal_index
        self.rich_bytes -= sum(block.rich_bytes for block in self.retired.values())
        self.retired = {}
        for key in [k for k, b in self.blocks.items() if 0 < b.seal_index <= upto_seal_index]:
            self.retired[key] = self.blocks.pop(key)
        # Ids of an hour with nothing left live are not needed: memory stays bounded by
        # the unpublished data (a later late part of that hour dedups at processing).
        live_hours = {(k[0], k[1]) for k in self.blocks}
        for hour in [h for h in self.seen_ids if h not in live_hours]:
            del self.seen_ids[hour]

    def minutes(
        self, site: str, start_ms: int, end_ms: int, published_upto: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sparse (minute_ms, count) of ``site`` in [start, end) from blocks that are not
        in the warehouse as of ``published_upto`` (the reader's catalog cursor)."""
        code = self.codes.get(site)
        empty = np.zeros(0, dtype=np.int64)
        if code is None:
            return empty, empty
        lo = max(start_ms // MINUTE_MS + (start_ms % MINUTE_MS > 0), 0)
        hi = min(-(-end_ms // MINUTE_MS), MINUTE_MASK)
        if lo >= hi:
            return empty, empty
        found = [
            block.site(code, lo, hi)
            for block in [*self.blocks.values(), *self.retired.values()]
            if not 0 < block.seal_index <= published_upto  # the reader's warehouse has it
        ]
        if not found:
            return empty, empty
        minutes, inverse = np.unique(np.concatenate([m for m, _ in found]), return_inverse=True)
        counts = np.bincount(
            inverse, weights=np.concatenate([c for _, c in found]), minlength=len(minutes)
        )
        return minutes * MINUTE_MS, counts.astype(np.int64)

    def facts(
        self,
        site: str,
        start_ms: int,
        end_ms: int,
        published_upto: int,
        shard: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, pa.Table | None]:
        """:meth:`minutes` of ``site``, and its kept raw events in [start, end) from the
        same blocks (None when there are none): the query side derives facts from those
        and counts the rest of each minute as page views without insight fields.
        ``shard``: the site's, so that only its blocks are decoded."""
        minutes, counts = self.minutes(site, start_ms, end_ms, published_upto)
        if not len(minutes):
            return minutes, counts, None
        tables = [
            from_ipc_many(block.rich)
            for key, block in [*self.blocks.items(), *self.retired.items()]
            if block.rich
            and not 0 < block.seal_index <= published_upto
            and (shard is None or key[0] == shard)
            and start_ms < (key[1] + 1) * HOUR_MS
            and key[1] * HOUR_MS < end_ms
        ]
        if not tables:
            return minutes, counts, None
        # One filter over every kept table: a few calls, not a few per table. By
        # minute, as minutes() counts: a minute is in when it starts in the range.
        rich = pa.concat_tables(tables, promote_options="default")
        minute = pc.multiply(pc.divide(rich.column("ts"), MINUTE_MS), MINUTE_MS)
        mask = pc.and_(
            pc.equal(rich.column("site"), pa.scalar(site, pa.string())),
            pc.and_(pc.greater_equal(minute, start_ms), pc.less(minute, end_ms)),
        )
        found = _first_of_each_id(rich.filter(mask))
        if not found.num_rows:
            return minutes, counts, None
        return minutes, counts, found.select(list(RICH_COLUMNS)).combine_chunks()


def _first_of_each_id(events: pa.Table) -> pa.Table:
    """Events in commit order with each (site, id) once, the first: what the counts hold
    (a retried batch is committed again, and its payloads were kept again)."""
    ids = events.column("id")
    if ids.null_count == len(ids):
        return events
    keep = SeenIds().first(events.column("site").combine_chunks(), ids.combine_chunks())
    return events.filter(pa.array(keep))
