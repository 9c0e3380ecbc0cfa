"""A replicated log entry and its kinds: what the replication core orders and the raw
log stores. Kept in the core so that the rules never import storage."""

from __future__ import annotations

from dataclasses import dataclass

KIND_DATA = 1
KIND_SEAL = 2
# A no-op a new master appends at the start of its term, so that entries of earlier
# terms become committed through it (Raft's rule); it lives in the control block.
KIND_NOOP = 3
KINDS = (KIND_DATA, KIND_SEAL, KIND_NOOP)
CONTROL_SHARD = 0xFFFF


@dataclass(frozen=True)
class Entry:
    """One replicated log entry: a batch of events for one block, or a block's seal."""

    term: int
    index: int
    kind: int
    shard: int
    hour: int
    part: int
    payload: bytes = b""

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.shard, self.hour, self.part)
