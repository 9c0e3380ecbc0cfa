"""Which block new events go to, and when an open block is due to be sealed.

Pure: the master feeds it appends and the clock as numbers, and asks which blocks to
seal. A block is (shard, hour, part). Once a part is sealed, later events of the same
(shard, hour) open the next part, which is processed as a re-run of that hour.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowray.core.units import HOUR_MS
from flowray.storage.replica_log import BlockInfo, BlockKey
from flowray.storage.segment import CONTROL_SHARD

SEAL_MODES = ("due", "closed", "all")


@dataclass
class OpenBlock:
    key: BlockKey
    bytes: int
    first_append_ms: int
    last_append_ms: int


@dataclass(frozen=True)
class SealPolicy:
    grace_ms: int
    idle_ms: int
    open_max_ms: int
    bytes_max: int


class BlockTable:
    """Open parts per (shard, hour), rebuilt from the log when a master starts."""

    def __init__(self, policy: SealPolicy) -> None:
        self.policy = policy
        self.open: dict[tuple[int, int], OpenBlock] = {}
        self.next_part: dict[tuple[int, int], int] = {}

    def load(self, blocks: dict[BlockKey, BlockInfo], now_ms: int) -> None:
        """Rebuild from the log; arrival times are unknown after a restart, so 'now'."""
        self.open.clear()
        self.next_part.clear()
        for key, info in sorted(blocks.items()):
            shard, hour, part = key
            if shard == CONTROL_SHARD:
                continue
            self.next_part[(shard, hour)] = max(self.next_part.get((shard, hour), 0), part + 1)
            if not info.sealed:
                self.open[(shard, hour)] = OpenBlock(key, info.bytes, now_ms, now_ms)
                self.next_part[(shard, hour)] = part

    def place(self, shard: int, hour: int, nbytes: int, now_ms: int) -> int:
        """The part that an append of ``nbytes`` to (shard, hour) goes to."""
        block = self.open.get((shard, hour))
        if block is None:
            part = self.next_part.get((shard, hour), 0)
            block = OpenBlock((shard, hour, part), 0, now_ms, now_ms)
            self.open[(shard, hour)] = block
            self.next_part[(shard, hour)] = part
        block.bytes += nbytes
        block.last_append_ms = now_ms
        return block.key[2]

    def due(self, now_ms: int, mode: str) -> list[BlockKey]:
        """Open blocks to seal now.

        ``due``: the normal rule (full, or the hour and its grace are over and the block
        is idle or has been open long enough); ``closed``: every block whose hour and
        grace are over; ``all``: every open block, the current hour's included.
        """
        if mode not in SEAL_MODES:
            raise ValueError(f"seal mode must be one of {', '.join(SEAL_MODES)}")
        out = []
        p = self.policy
        for (_shard, hour), block in self.open.items():
            closed = now_ms >= (hour + 1) * HOUR_MS + p.grace_ms
            full = block.bytes >= p.bytes_max
            settled = (
                now_ms - block.last_append_ms >= p.idle_ms
                or now_ms - block.first_append_ms >= p.open_max_ms
            )
            if mode == "all" or full or (closed and mode == "closed") or (closed and settled):
                out.append(block.key)
        return sorted(out)

    def sealed(self, key: BlockKey) -> None:
        shard, hour, part = key
        block = self.open.get((shard, hour))
        if block is not None and block.key == key:
            del self.open[(shard, hour)]
            self.next_part[(shard, hour)] = part + 1

    def oldest_open_hour(self) -> int | None:
        return min((hour for (_s, hour) in self.open), default=None)
