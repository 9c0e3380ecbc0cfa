"""Live counts: per (site, minute) counts of committed events not yet in the warehouse.

A group's master keeps them so a query sees traffic seconds after it is acknowledged,
long before its hour is processed. They follow the processing rules exactly — the
default logic, and an event with an id counted once per (site, id) within its (shard,
hour) — so when a block is published its counts equal what the live counts said, and
the block's live counts are then dropped. Pure: the master feeds it committed blocks
and publication cursors.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from flowray.invariant import require
from flowray.storage.replica_log import BlockKey

MINUTE_MS = 60_000


@dataclass
class _Block:
    # site -> minute (epoch ms) -> events: a query looks up one site per block.
    counts: dict[str, dict[int, int]] = field(default_factory=dict)
    seal_index: int = 0  # 0 while open


class LiveCounts:
    def __init__(self) -> None:
        self.blocks: dict[BlockKey, _Block] = {}
        # Published blocks stay one more publication, for readers whose catalog
        # snapshot predates the publish: they must not see the block in neither place.
        self.retired: dict[BlockKey, _Block] = {}
        # (site, id) already counted, per (shard, hour): duplicates count once.
        self.seen_ids: dict[tuple[int, int], set[tuple[str, str]]] = defaultdict(set)
        self.published_upto = 0

    def apply(self, key: BlockKey, events: pa.Table) -> None:
        """Count one committed batch of events of block ``key``."""
        block = self.blocks.setdefault(key, _Block())
        ids = events.column("id")
        if ids.null_count < len(ids):
            seen = self.seen_ids[(key[0], key[1])]
            keep = []
            for site, event_id in zip(
                events.column("site").to_pylist(), ids.to_pylist(), strict=True
            ):
                if event_id is None:
                    keep.append(True)
                elif (site, event_id) in seen:
                    keep.append(False)
                else:
                    seen.add((site, event_id))
                    keep.append(True)
            events = events.filter(pa.array(keep))
        if events.num_rows == 0:
            return
        # Counted with numpy on (site code, minute number) keys: Arrow's group_by has a
        # large fixed cost per call, and this runs for every committed entry.
        encoded = events.column("site").combine_chunks().dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        minutes = events.column("ts").to_numpy() // MINUTE_MS
        require(minutes.min() >= 0 and minutes.max() < 1 << 32, "a minute out of the key's range")
        keys, counts = np.unique((codes << 32) | minutes, return_counts=True)
        names = encoded.dictionary.to_pylist()
        for k, n in zip(keys.tolist(), counts.tolist(), strict=True):
            per_minute = block.counts.setdefault(names[k >> 32], {})
            m = (k & 0xFFFFFFFF) * MINUTE_MS
            per_minute[m] = per_minute.get(m, 0) + n

    def sealed(self, key: BlockKey, seal_index: int) -> None:
        if key in self.blocks:
            self.blocks[key].seal_index = seal_index

    def published(self, upto_seal_index: int) -> None:
        """Blocks sealed at or before ``upto_seal_index`` are in the warehouse: drop them."""
        if upto_seal_index <= self.published_upto:
            return
        self.published_upto = upto_seal_index
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
        totals: dict[int, int] = defaultdict(int)
        for block in [*self.blocks.values(), *self.retired.values()]:
            if 0 < block.seal_index <= published_upto:
                continue  # the reader's warehouse has it already
            for minute, n in block.counts.get(site, {}).items():
                if start_ms <= minute < end_ms:
                    totals[minute] += n
        minutes = np.array(sorted(totals), dtype=np.int64)
        return minutes, np.array([totals[m] for m in minutes], dtype=np.int64)
