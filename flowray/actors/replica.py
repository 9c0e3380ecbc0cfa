"""A replica of a shard group: master or follower, as one Ray actor.

The master orders proposals into log entries, appends and fsyncs them, ships them to
the followers, and answers a proposal only when a majority of the group (itself
included) has the entries on disk. Followers check that each append continues their
log (same index and term before it), cut a divergent uncommitted tail, and fsync
before they answer. Writes to the log happen on one writer task at a time; file I/O
runs in a worker thread so the actor keeps answering while the disk works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from flowray.actors.blocks import BlockTable, SealPolicy
from flowray.config import Settings
from flowray.invariant import require
from flowray.quorum import committed_index
from flowray.storage.durable import write_json_atomic
from flowray.storage.replica_log import BlockKey, ReplicaLog
from flowray.storage.segment import (
    CONTROL_SHARD,
    KIND_DATA,
    KIND_NOOP,
    KIND_SEAL,
    Entry,
)

PENDING_PROPOSALS_MAX = 10_000
APPEND_BYTES_MAX = 16 * 1024 * 1024
RETRY_BACKOFF_S = 0.2
HEARTBEAT_S = 1.0
WRITE_BATCH_BYTES_MAX = 64 * 1024 * 1024


class NotMaster(RuntimeError):
    """This replica is not the master; retry against the current one."""


class NoQuorum(RuntimeError):
    """A majority did not confirm in time; the write may or may not commit later."""


class Overloaded(RuntimeError):
    """Too many proposals are waiting; the client should back off."""


@dataclass
class _Proposal:
    pieces: list[tuple[int, int, bytes]]  # (shard, hour, payload); shard CONTROL for no-ops
    kind: int
    future: asyncio.Future[int]
    last_index: int = 0
    seal_keys: list[BlockKey] = field(default_factory=list)


def actor_name(group: int, replica: int) -> str:
    return f"flowray-g{group:03d}-r{replica}"


def _now_ms() -> int:
    return int(time.time() * 1000)


@ray.remote(num_cpus=0, max_restarts=0)
class Replica:
    def __init__(self, settings_json: dict[str, Any], group: int, replica: int) -> None:
        self.settings = Settings.from_json(settings_json)
        self.group = group
        self.replica = replica
        self.root = self.settings.replica_dir(group, replica)
        self.log = ReplicaLog(self.root)
        self.state_file = self.root / "state.json"
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.term: int = int(state.get("term", 0))
        self.commit_index = 0
        self.role = "follower"
        self.followers: dict[int, Any] = {}
        self.match: dict[int, int | None] = {}
        self._pending: list[_Proposal] = []
        self._waiting: list[_Proposal] = []
        self._wake: asyncio.Event | None = None
        self._kick: dict[int, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lock: asyncio.Lock | None = None
        s = self.settings
        self.blocks = BlockTable(
            SealPolicy(
                int(s.seal_grace_s * 1000),
                int(s.seal_idle_s * 1000),
                int(s.seal_open_max_s * 1000),
                s.block_bytes_max,
            )
        )

    # ---- hard state ------------------------------------------------------------------
    def _persist_term(self, term: int) -> None:
        require(term >= self.term, "the term never goes back")
        self.term = term
        write_json_atomic(self.state_file, {"term": term})

    # ---- master ----------------------------------------------------------------------
    async def become_master(self, followers: dict[int, Any]) -> int:
        """Take the master role under a new term and start replicating to ``followers``."""
        self._persist_term(self.term + 1)
        self.role = "master"
        self.followers = followers
        self.match = {self.replica: self.log.last_index}
        self.match.update({f: None for f in followers})
        self.blocks.load(self.log.blocks, _now_ms())
        self._wake = asyncio.Event()
        for f, handle in followers.items():
            self._kick[f] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._replicate(f, handle)))
        self._tasks.append(asyncio.create_task(self._write_loop()))
        # A no-op of the new term commits every entry of earlier terms before it.
        await self._submit([(CONTROL_SHARD, 0, b"")], KIND_NOOP)
        return self.term

    async def propose(self, pieces: list[tuple[int, int, bytes]]) -> int:
        """Append event pieces; returns the last index once a majority has it on disk."""
        if self.role != "master":
            raise NotMaster(f"replica {self.replica} of group {self.group} is not the master")
        return await self._submit(pieces, KIND_DATA)

    async def _submit(self, pieces: list[tuple[int, int, bytes]], kind: int) -> int:
        require(self._wake is not None, "the master has not started")
        if len(self._pending) >= PENDING_PROPOSALS_MAX:
            raise Overloaded("too many writes waiting for the disk; retry shortly")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(_Proposal(pieces, kind, future))
        self._wake.set()  # type: ignore[union-attr]
        try:
            return await asyncio.wait_for(
                asyncio.shield(future), timeout=self.settings.commit_timeout_s
            )
        except TimeoutError as exc:
            raise NoQuorum(
                f"group {self.group}: no majority confirmed within "
                f"{self.settings.commit_timeout_s} s"
            ) from exc

    async def _write_loop(self) -> None:
        """Group commit: everything that queued while the disk was busy goes in one append."""
        wake = self._wake
        require(wake is not None, "write loop without a wake event")
        while True:
            await wake.wait()  # type: ignore[union-attr]
            wake.clear()  # type: ignore[union-attr]
            batch = self._take_batch()
            if not batch:
                continue
            if self._pending:
                wake.set()  # type: ignore[union-attr]
            entries = self._to_entries(batch)
            try:
                await asyncio.to_thread(self.log.append, entries)
            except Exception as exc:  # an I/O error fails these writes, not the actor
                for proposal in batch:
                    if not proposal.future.done():
                        proposal.future.set_exception(exc)
                self.log = ReplicaLog(self.root)  # reload what is really on disk
                continue
            self.match[self.replica] = self.log.last_index
            self._waiting.extend(batch)
            for event in self._kick.values():
                event.set()
            self._advance_commit()

    def _take_batch(self) -> list[_Proposal]:
        size = 0
        for n, proposal in enumerate(self._pending):
            size += sum(len(p[2]) for p in proposal.pieces)
            if size > WRITE_BATCH_BYTES_MAX and n > 0:
                batch, self._pending = self._pending[:n], self._pending[n:]
                return batch
        batch, self._pending = self._pending, []
        return batch

    def _to_entries(self, batch: list[_Proposal]) -> list[Entry]:
        entries: list[Entry] = []
        index = self.log.last_index
        now = _now_ms()
        for proposal in batch:
            for shard, hour, payload in proposal.pieces:
                index += 1
                if proposal.kind == KIND_NOOP:
                    part = 0
                elif proposal.kind == KIND_SEAL:
                    part = self._seal_part(shard, hour, proposal)
                    payload = b""
                else:
                    part = self.blocks.place(shard, hour, len(payload), now)
                entries.append(Entry(self.term, index, proposal.kind, shard, hour, part, payload))
            proposal.last_index = index
        return entries

    def _seal_part(self, shard: int, hour: int, proposal: _Proposal) -> int:
        block = self.blocks.open.get((shard, hour))
        require(block is not None, f"seal of ({shard}, {hour}) which has no open block")
        part = block.key[2]  # type: ignore[union-attr]
        self.blocks.sealed((shard, hour, part))
        proposal.seal_keys.append((shard, hour, part))
        return part

    def _advance_commit(self) -> None:
        voters = len(self.followers) + 1
        candidate = committed_index(self.match, voters)
        # Raft: count replicas only for entries of the current term.
        if candidate > self.commit_index and self.log.term_at(candidate) == self.term:
            self.commit_index = candidate
        still = []
        for proposal in self._waiting:
            if proposal.last_index <= self.commit_index:
                if not proposal.future.done():
                    proposal.future.set_result(proposal.last_index)
            else:
                still.append(proposal)
        self._waiting = still

    async def _replicate(self, follower: int, handle: Any) -> None:
        """Ship the log to one follower, in order, catching it up from disk if needed."""
        next_index = self.log.last_index + 1
        kick = self._kick[follower]
        while self.role == "master":
            kick.clear()
            if next_index > self.log.last_index:
                # Idle: wait for new entries, or send a heartbeat that carries the commit index.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(kick.wait(), timeout=HEARTBEAT_S)
            entries = (
                await asyncio.to_thread(self.log.read, next_index, APPEND_BYTES_MAX)
                if next_index <= self.log.last_index
                else []
            )
            prev = next_index - 1
            try:
                term, ok, last = await asyncio.wait_for(
                    handle.append_entries.remote(
                        self.term, prev, self.log.term_at(prev), entries, self.commit_index
                    ),
                    timeout=self.settings.rpc_timeout_s,
                )
            except Exception:  # follower down or slow: retry with backoff, never give up
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            if term > self.term:
                self.role = "follower"  # fenced by a newer master
                return
            if ok:
                match = entries[-1].index if entries else prev
                self.match[follower] = match
                next_index = match + 1
                self._advance_commit()
            else:
                next_index = max(1, min(next_index - 1, last + 1))

    async def seal(self, mode: str) -> list[BlockKey]:
        """Seal the blocks that are due (see BlockTable.due); returns them once committed."""
        if self.role != "master":
            raise NotMaster(f"replica {self.replica} of group {self.group} is not the master")
        keys = self.blocks.due(_now_ms(), mode)
        if not keys:
            return []
        await self._submit([(s, h, b"") for s, h, _p in keys], KIND_SEAL)
        return keys

    # ---- follower --------------------------------------------------------------------
    async def append_entries(
        self, term: int, prev_index: int, prev_term: int, entries: list[Entry], commit: int
    ) -> tuple[int, bool, int]:
        """Raft's AppendEntries: (my term, accepted, my last index)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if term < self.term:
                return self.term, False, self.log.last_index
            if term > self.term:
                await asyncio.to_thread(self._persist_term, term)
            if prev_index > self.log.last_index or self.log.term_at(prev_index) != prev_term:
                return self.term, False, min(self.log.last_index, max(prev_index - 1, 0))
            fresh = self._drop_known(entries)
            if fresh:
                require(fresh[0].index > self.commit_index, "a committed entry would be replaced")
                if fresh[0].index <= self.log.last_index:
                    await asyncio.to_thread(self.log.truncate_after, fresh[0].index - 1)
                await asyncio.to_thread(self.log.append, fresh)
            last_new = entries[-1].index if entries else prev_index
            self.commit_index = max(self.commit_index, min(commit, last_new))
            return self.term, True, self.log.last_index

    def _drop_known(self, entries: list[Entry]) -> list[Entry]:
        """Entries already in the log with the same term are skipped (a resend)."""
        for i, entry in enumerate(entries):
            if entry.index > self.log.last_index or self.log.term_at(entry.index) != entry.term:
                return entries[i:]
        return []

    # ---- reads and status ------------------------------------------------------------
    def sealed_blocks(self, after_index: int) -> list[dict[str, int]]:
        """Committed seals after ``after_index``, oldest first, with each block's size."""
        out = []
        for key, info in self.log.blocks.items():
            if after_index < info.seal_index <= self.commit_index:
                out.append(
                    {
                        "shard": key[0],
                        "hour": key[1],
                        "part": key[2],
                        "seal_index": info.seal_index,
                        "bytes": info.bytes,
                        "entries": info.entries - 1,
                    }
                )
        return sorted(out, key=lambda b: b["seal_index"])

    def block_parts(self, shard: int, hour: int, upto_index: int) -> list[tuple[int, int]]:
        """(part, bytes) of the sealed parts of (shard, hour) sealed at or before ``upto_index``."""
        return sorted(
            (key[2], info.bytes)
            for key, info in self.log.blocks.items()
            if key[0] == shard and key[1] == hour and 0 < info.seal_index <= upto_index
        )

    async def read_block(self, key: BlockKey, slice_no: int, slices: int) -> list[bytes]:
        """One slice of a sealed block's committed payloads (see ReplicaLog.block_payloads)."""
        block: BlockKey = (int(key[0]), int(key[1]), int(key[2]))
        info = self.log.blocks.get(block)
        require(info is not None and info.sealed, f"block {key} is not sealed here")
        upto = info.seal_index if info is not None else 0
        return await asyncio.to_thread(self.log.block_payloads, block, upto, slice_no, slices)

    def status(self) -> dict[str, Any]:
        open_blocks = [
            b for b in self.log.blocks.values() if not b.sealed and b.key[0] != CONTROL_SHARD
        ]
        return {
            "group": self.group,
            "replica": self.replica,
            "role": self.role,
            "term": self.term,
            "last_index": self.log.last_index,
            "commit_index": self.commit_index,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "dir": str(self.root),
            "blocks_open": len(open_blocks),
            "blocks_sealed": sum(1 for b in self.log.blocks.values() if b.sealed),
            "match": dict(self.match) if self.role == "master" else None,
            "oldest_open_hour": self.blocks.oldest_open_hour() if self.role == "master" else None,
        }

    def ping(self) -> int:
        return self.term
