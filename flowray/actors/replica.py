"""A replica of a shard group as a Ray actor: a thin shell around the replication core.

The core (:mod:`flowray.core.replication`) decides; this shell does the I/O it asks for,
in the order it asks: persist the hard state and the log (fsync) before sending,
send messages to the other replicas over direct links (:mod:`flowray.actors.wire`), never
waited for, then advance the core and answer the proposals that are committed. A
tick task drives elections, heartbeats and the master's lease from the monotonic
clock: whatever handler runs first after the process was stopped (SIGSTOP, a long GC
or VM stall) first feeds the core the ticks it missed, so a paused master steps down
before it reads what queued meanwhile. Ray restarts a replica whose process dies; it
then recovers from its own directory (cutting a torn tail) and catches up from the
master.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from flowray.actors import memtrim
from flowray.actors.names import actor_name
from flowray.actors.wire import MSGS, Address, Link, Server, encode_msgs
from flowray.config import Settings
from flowray.core.invariant import require
from flowray.core.replication import ABSTAIN_UNKNOWN, Msg, Node, NotMaster, Ready, Role, Timing
from flowray.query.live import LiveCounts
from flowray.storage.blocks import BlockTable, SealPolicy
from flowray.storage.durable import write_json_atomic
from flowray.storage.replica_log import BlockKey, ReplicaLog
from flowray.storage.segment import CONTROL_SHARD, KIND_DATA, KIND_SEAL
from flowray.warehouse.catalog import Catalog

log = logging.getLogger("flowray.replica")
PENDING_PROPOSALS_MAX = 10_000
LIVE_READ_BYTES_MAX = 64 * 1024 * 1024
# A Ready whose entries hold at most this many bytes is persisted on the event loop:
# handing it to a thread and back cost more than the write and its one fsync.
PERSIST_INLINE_BYTES_MAX = 256 * 1024
# Newly committed entries are counted for live counts at most this often (and on
# every tick): one hand-off to the counting thread per commit was a large share of a
# master's work for small proposals.
LIVE_COUNT_INTERVAL_S = 0.05
# A new master re-counts an unpublished block's payloads this many at a time: a block
# of an hour can hold millions of events, and decoded they take about ten times the
# space they take on disk.
LIVE_APPLY_PAYLOADS_MAX = 256
READ_THREADS = 2  # block slices for processing, live counts for queries
# The most ticks fed at once after a stall: enough to step down and stand for election.
TICKS_OWED_MAX = 100


class NoQuorum(RuntimeError):
    """A majority did not confirm in time; the write may or may not commit later."""


class Overloaded(RuntimeError):
    """Too many proposals are waiting; the client should back off."""


# The errors a proposal sent over a wire link comes back with, as themselves.
WIRE_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls for cls in (NotMaster, NoQuorum, Overloaded)
}


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Waiter:
    last_index: int
    term: int
    future: asyncio.Future[int]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Replica:
    def __init__(self, settings_json: dict[str, Any], group: int, replica: int) -> None:
        s = self.settings = Settings.from_json(settings_json)
        self.group, self.replica = group, replica
        self.root = s.replica_dir(group, replica)
        self.log = ReplicaLog(self.root, fault_injection=bool(s.fault_injection))
        self.state_file = self.root / "state.json"
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        # Restarted by Ray with no state: on another node, in an empty directory. It
        # may have voted before, so it abstains until caught up (see replication).
        with warnings.catch_warnings():  # Ray's own property uses a deprecated one
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        lost = not state and restarted
        if lost:
            log.warning("group %s replica %s restarts without its state", group, replica)
        self.node = Node(
            replica,
            list(range(s.replicas)),
            self.log,
            term=int(state.get("term", 0)),
            voted_for=state.get("voted_for"),
            timing=Timing(s.election_ticks, s.heartbeat_ticks),
            rng=random.Random(int.from_bytes(os.urandom(8), "little")),
            abstain=state.get("abstain", ABSTAIN_UNKNOWN if lost else None),
        )
        self.blocks = BlockTable(
            SealPolicy(
                int(s.seal_grace_s * 1000),
                int(s.seal_idle_s * 1000),
                int(s.seal_open_max_s * 1000),
                s.block_bytes_max,
            )
        )
        self.blocks_term = -1
        self.live = LiveCounts(self.settings.live_facts_bytes_max)
        self.live_term = -1
        self.live_applied = 0
        self._live_counted_at = 0.0
        self.live_errors = 0
        self.reads_served = 0  # block slices read for processing
        self.late_events = 0  # events for hours already sealed, since this process began
        self.live_ready_term = -1
        self.live_lock = threading.Lock()
        self.live_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live")
        # Reads for processing and queries, on threads of their own: on the default
        # pool they could take every thread and hold up the persisting of large appends.
        self.read_worker = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="read")
        self.links: dict[int, Link] = {}
        self.wire: Server | None = None
        self._wire_ready: asyncio.Event | None = None
        self.waiters: list[_Waiter] = []
        self._notified_commit = 0
        self.started = False
        self.restarts = 0
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ticked_at = time.monotonic()

    # ---- lifecycle -------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self.started:
            return
        self.started = True
        self._wake = asyncio.Event()
        self._wire_ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._crash_on_error(self._serve_wire())),
            asyncio.create_task(self._crash_on_error(self._tick_loop())),
            asyncio.create_task(self._crash_on_error(self._ready_loop())),
            asyncio.create_task(memtrim.trim_forever()),
        ]

    async def _serve_wire(self) -> None:
        """Listen for peers' messages and the ingress's proposals on this node's address."""
        self.wire = Server(
            ray.util.get_node_ip_address(),
            self._receive,
            self._on_call,
            WIRE_ERRORS,
            on_gone=self._peer_gone,
        )
        await self.wire.start()
        self._wire_ready.set()  # type: ignore[union-attr]

    async def wire_address(self) -> Address:
        """(host, port, token) of this replica's wire server (see :mod:`flowray.actors.wire`)."""
        self._ensure_started()
        await asyncio.wait_for(self._wire_ready.wait(), self.settings.rpc_timeout_s)  # type: ignore[union-attr]
        require(self.wire is not None, "the wire server is not up")
        return self.wire.address  # type: ignore[union-attr]

    async def _on_call(self, method: str, args: Any) -> Any:
        if method == "propose":
            return await self.propose([tuple(p) for p in args])
        raise ValueError(f"unknown wire call {method!r}")

    async def _crash_on_error(self, loop: Any) -> None:
        """A loop that dies leaves a replica that answers but never replicates: crash the
        process instead, so Ray restarts it and it recovers from its disk."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.critical(
                "group %s replica %s: a replication loop failed; exiting",
                self.group,
                self.replica,
                exc_info=True,
            )
            os._exit(70)

    async def start(self) -> int:
        """Start ticking (also done by the first call of any kind, after a restart)."""
        self._ensure_started()
        return self.node.term

    async def _tick_loop(self) -> None:
        tick_s = self.settings.tick_s
        while True:
            await asyncio.sleep(max(0.0, self._ticked_at + tick_s - time.monotonic()))
            self._catch_up()
            if self.node.role == Role.MASTER and self.blocks_term == self.node.term:
                self._update_live(force=True)

    def _catch_up(self) -> None:
        """Feed the core the ticks the monotonic clock owes it (at most TICKS_OWED_MAX).
        Called first by every handler, so that after a stall time passes before any
        message that queued during it is read."""
        tick_s = self.settings.tick_s
        owed = int((time.monotonic() - self._ticked_at) / tick_s)
        if owed <= 0:
            return
        if owed > TICKS_OWED_MAX:
            log.warning(
                "group %s replica %s: stalled for %.1f s",
                self.group,
                self.replica,
                owed * tick_s,
            )
            self._ticked_at = time.monotonic()
        else:
            self._ticked_at += owed * tick_s
        was_master = self.node.role == Role.MASTER
        for _ in range(min(owed, TICKS_OWED_MAX)):
            self.node.tick()
        if was_master and self.node.role != Role.MASTER:
            self._after_advance()  # stepped down: its waiting writers learn it now
        self._kick()

    def _kick(self) -> None:
        """Wake the ready loop when the core has work or newly committed entries."""
        node = self.node
        if self._wake is not None and (
            node.has_ready() or node.commit_index != self._notified_commit
        ):
            self._wake.set()

    async def _ready_loop(self) -> None:
        wake = self._wake
        require(wake is not None, "ready loop without a wake event")
        while True:
            await wake.wait()  # type: ignore[union-attr]
            wake.clear()  # type: ignore[union-attr]
            while self.node.has_ready():
                rd = self.node.ready()
                if rd.send_first:
                    self._send(rd.messages)
                if sum(len(e.payload) for e in rd.entries) <= PERSIST_INLINE_BYTES_MAX:
                    self._persist(rd)  # an fsync'd append of a few KiB: cheaper than a thread
                else:
                    await asyncio.to_thread(self._persist, rd)
                if not rd.send_first:
                    self._send(rd.messages)
                self.node.advance(rd)
                self._after_advance()
            self._after_advance()

    def _persist(self, rd: Ready) -> None:
        """Step 2 of the core's contract: hard state, cut, append, fsync."""
        if rd.hard_state_changed:
            write_json_atomic(
                self.state_file,
                {"term": rd.term, "voted_for": rd.voted_for, "abstain": rd.abstain},
            )
        if rd.truncate_after is not None:
            self.log.truncate_after(rd.truncate_after)
        if rd.entries:
            self.log.append(rd.entries)

    def _send(self, messages: list[Msg]) -> None:
        by_peer: dict[int, list[Msg]] = {}
        for msg in messages:
            by_peer.setdefault(msg.dst, []).append(msg)
        for peer, msgs in by_peer.items():
            # Never waits: the core copes with loss, and resends on the next heartbeat.
            self._link(peer).send(MSGS, encode_msgs(msgs))

    def _link(self, peer: int) -> Link:
        if peer not in self.links:

            async def resolve() -> Address:
                handle = ray.get_actor(
                    actor_name(self.group, peer), namespace=self.settings.namespace
                )
                address: Address = await handle.wire_address.remote()
                return address

            self.links[peer] = Link(resolve)
        return self.links[peer]

    def _after_advance(self) -> None:
        node = self.node
        if (
            node.role == Role.MASTER
            and self.blocks_term != node.term
            and node.stable_last == self.log.last_index
        ):
            self.blocks.load(self.log.blocks, _now_ms())
            self.blocks_term = node.term
        if node.role == Role.MASTER and self.blocks_term == node.term:
            self._update_live(force=False)
        elif self.live_term != -1:
            self.live_term = self.live_ready_term = -1  # only a master serves live counts
            self.live_worker.submit(self._forget_live)
        still = []
        for w in self.waiters:
            if w.future.done():
                continue
            if node.role != Role.MASTER or node.term != w.term:
                # Appended but not committed: it may still commit under the next
                # master, so the caller must not resend it elsewhere at once.
                w.future.set_exception(
                    NotMaster(
                        f"group {self.group}: mastership changed before commit",
                        node.leader,
                        refused=False,
                    )
                )
            elif node.commit_index >= w.last_index:
                require(node.term_at(w.last_index) == w.term, "a master replaced its own entry")
                w.future.set_result(w.last_index)
            else:
                still.append(w)
        self.waiters = still
        self._notified_commit = node.commit_index

    # ---- live counts -----------------------------------------------------------------
    # Counting decodes every committed payload, and a new master first re-reads its
    # unpublished blocks: both run on one worker thread, in commit order, so the event
    # loop keeps answering heartbeats and votes (a rebuild on the loop once stalled
    # failover for seconds). ``live_lock`` guards the counts against queries.

    def _update_live(self, force: bool) -> None:
        """Queue the counting of newly committed entries (a rebuild first, if new master);
        unless ``force``, at most every LIVE_COUNT_INTERVAL_S."""
        node = self.node
        if node.commit_index == 0 or node.term_at(node.commit_index) != node.term:
            return  # wait for this term's no-op: then everything before it is committed
        commit = node.commit_index
        now = time.monotonic()
        if self.live_term != node.term:
            self.live_term, self.live_ready_term = node.term, -1
            self.live_worker.submit(self._rebuild_live, node.term, commit)
        elif commit > self.live_applied and (
            force or now - self._live_counted_at >= LIVE_COUNT_INTERVAL_S
        ):
            self.live_worker.submit(self._count_range, self.live_applied + 1, commit)
        else:
            return
        self._live_counted_at = now
        self.live_applied = commit

    def _forget_live(self) -> None:
        with self.live_lock:
            self.live = LiveCounts(self.settings.live_facts_bytes_max)

    def _count_range(self, first: int, last: int) -> None:
        """Count the committed entries first..last, each block's payloads in one go.
        A block's payloads are counted at its seal entry at the latest, so the parts of
        an hour (a later part begins after the earlier one's seal) count in log order,
        as processing does."""
        index = first
        while index <= last:
            batch = [e for e in self.log.read(index, LIVE_READ_BYTES_MAX) if e.index <= last]
            if not batch:
                break
            pending: dict[BlockKey, list[bytes]] = {}
            with self.live_lock:
                for entry in batch:
                    if entry.shard == CONTROL_SHARD:
                        continue
                    if entry.kind == KIND_DATA:
                        pending.setdefault(entry.block, []).append(entry.payload)
                    elif entry.kind == KIND_SEAL:
                        self._live_apply(self.live, entry.block, pending.pop(entry.block, []))
                        self.live.sealed(entry.block, entry.index)
                for key, payloads in pending.items():
                    self._live_apply(self.live, key, payloads)
            index = batch[-1].index + 1

    def _live_apply(self, live: LiveCounts, key: BlockKey, payloads: list[bytes]) -> None:
        """Count committed payloads; one that does not decode is counted as an error
        (processing will report it too), never a reason to stop replicating. Nor is a
        failure of the counting itself: it runs on the live worker, where an exception
        would end the range unseen, so it is logged and counted and the next block goes
        on (processing publishes the exact counts either way)."""
        try:
            errors = live.apply_payloads(key, payloads)
        except Exception as exc:
            log.exception("group %s: live counts of %s failed", self.group, key)
            errors = [f"{type(exc).__name__}: {exc}"]
        for error in errors:
            self.live_errors += 1
            log.warning("group %s: live counts skip an entry of %s: %s", self.group, key, error)

    def _rebuild_live(self, term: int, commit: int) -> None:
        """Live counts of every committed block that the warehouse does not hold yet."""
        fresh = LiveCounts(self.settings.live_facts_bytes_max)
        published = Catalog(self.settings.warehouse_dir / "catalog.sqlite").cursor(self.group)
        for key, info in list(self.log.blocks.items()):
            if key[0] == CONTROL_SHARD or 0 < info.seal_index <= published:
                continue
            chunk: list[bytes] = []
            for payload in self.log.block_payloads(key, commit):
                chunk.append(payload)
                if len(chunk) >= LIVE_APPLY_PAYLOADS_MAX:
                    self._live_apply(fresh, key, chunk)
                    chunk = []
            self._live_apply(fresh, key, chunk)
            if 0 < info.seal_index <= commit:
                fresh.sealed(key, info.seal_index)
        fresh.published(published)
        with self.live_lock:
            self.live = fresh
            self.live_ready_term = term

    async def live_minutes(
        self, site: str, start_ms: int, end_ms: int, published_upto: int
    ) -> tuple[list[int], list[int]]:
        """Committed, not yet published (minute_ms, count) of a site: masters only.
        Read on a thread: the counting thread holds ``live_lock`` while it counts a
        batch, and this event loop replicates (it must never wait on that lock)."""
        self._require_master()
        if self.live_ready_term != self.node.term:
            raise NotMaster(f"group {self.group}: live counts are being rebuilt", self.replica)

        def read() -> tuple[list[int], list[int]]:
            with self.live_lock:
                minutes, counts = self.live.minutes(site, start_ms, end_ms, published_upto)
            return minutes.tolist(), counts.tolist()

        minutes, counts = await asyncio.get_running_loop().run_in_executor(self.read_worker, read)
        # Stepped down meanwhile? Its counts may be gone: say so rather than answer empty.
        self._require_master()
        if self.live_ready_term != self.node.term:
            raise NotMaster(f"group {self.group}: live counts are being rebuilt", self.replica)
        return minutes, counts

    async def live_facts(
        self, site: str, start_ms: int, end_ms: int, published_upto: int, shard: int | None = None
    ) -> tuple[list[int], list[int], pa.Table | None]:
        """:meth:`live_minutes` and the kept raw events of the same blocks
        (LiveCounts.facts): masters only, read on a thread like live_minutes."""
        self._require_master()
        if self.live_ready_term != self.node.term:
            raise NotMaster(f"group {self.group}: live counts are being rebuilt", self.replica)

        def read() -> tuple[list[int], list[int], pa.Table | None]:
            with self.live_lock:
                minutes, counts, rich = self.live.facts(
                    site, start_ms, end_ms, published_upto, shard
                )
            return minutes.tolist(), counts.tolist(), rich

        found = await asyncio.get_running_loop().run_in_executor(self.read_worker, read)
        self._require_master()
        if self.live_ready_term != self.node.term:
            raise NotMaster(f"group {self.group}: live counts are being rebuilt", self.replica)
        return found

    def published(self, upto_seal_index: int) -> None:
        """The processor published every block sealed at or before this index: drop
        their live counts and forget where their entries lie (ReplicaLog.release)."""

        # Read on the event loop, where the core runs: entries up to here are committed
        # and on disk as committed. (The commit index alone may already cover entries
        # that replace a divergent tail the disk still holds.)
        committed = min(self.node.commit_index, self.node.stable_last)

        def drop() -> None:
            with self.live_lock:
                self.live.published(upto_seal_index)
            self.log.release(upto_seal_index, committed)

        self.live_worker.submit(drop)  # after the counting queued before it

    # ---- messages from peers ---------------------------------------------------------
    def _receive(self, msgs: list[Msg]) -> None:
        self._catch_up()
        for msg in msgs:
            self.node.step(msg)
        self._kick()

    def _peer_gone(self, peer: int) -> None:
        """A peer's connection ended: if it was the master's, an election comes sooner
        (Node.leader_gone). kill -9 of a master ends its connections at once."""
        self.node.leader_gone(peer)
        self._kick()

    # ---- proposals -------------------------------------------------------------------
    def _require_master(self) -> None:
        """Proposals and live counts are a master's, within its lease: a master that
        has not heard from a majority for an election timeout may have been replaced."""
        self._catch_up()
        if (
            self.node.role != Role.MASTER
            or self.blocks_term != self.node.term
            or not self.node.lease_valid()
        ):
            raise NotMaster(
                f"replica {self.replica} of group {self.group} is not the master",
                self.node.leader if self.node.leader != self.replica else None,
            )

    async def _propose(self, items: list[tuple[int, int, int, int, bytes]]) -> int:
        if len(self.waiters) >= PENDING_PROPOSALS_MAX:
            raise Overloaded("too many writes waiting for a commit; retry shortly")
        _first, last = self.node.propose(items)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters.append(_Waiter(last, self.node.term, future))
        self._kick()
        try:
            return await asyncio.wait_for(
                asyncio.shield(future), timeout=self.settings.commit_timeout_s
            )
        except TimeoutError as exc:
            raise NoQuorum(
                f"group {self.group}: no majority confirmed within "
                f"{self.settings.commit_timeout_s} s"
            ) from exc

    async def propose(self, pieces: list[tuple[Any, ...]]) -> int:
        """Append (shard, hour, payload[, events]) pieces; returns once a majority has
        them on disk. Events that go to a later part of an hour whose first block is
        already sealed are late: they are counted, and re-publish that hour."""
        self._ensure_started()
        self._require_master()
        now = _now_ms()
        items = []
        for shard, hour, payload, *rest in pieces:
            part = self.blocks.place(shard, hour, len(payload), now)
            if part > 0:
                self.late_events += int(rest[0]) if rest else 0
            items.append((KIND_DATA, shard, hour, part, payload))
        return await self._propose(items)

    async def seal(self, mode: str) -> list[BlockKey]:
        """Seal the blocks that are due (see BlockTable.due); returns them once committed."""
        self._ensure_started()
        self._require_master()
        keys = self.blocks.due(_now_ms(), mode)
        if not keys:
            return []
        for key in keys:
            self.blocks.sealed(key)
        await self._propose([(KIND_SEAL, s, h, p, b"") for s, h, p in keys])
        return keys

    async def hand_over(self) -> int | None:
        """Hand mastership to the most up-to-date follower (for a rolling restart).

        Proposals are refused from now on (NotMaster, refused: safe to resend); returns
        the new master once this replica has stepped down, or None if the handover did
        not happen within an election timeout (then this master goes on).
        """
        self._ensure_started()
        self._require_master()
        node = self.node
        target = max(node.progress, key=lambda p: (node.progress[p].match, -p))
        node.transfer(target)
        self._kick()
        ticks = 2 * self.settings.election_ticks
        for _ in range(ticks):
            await asyncio.sleep(self.settings.tick_s)
            if node.role != Role.MASTER:
                return node.leader
        return None

    # ---- reads and status ------------------------------------------------------------
    def sealed_blocks(self, after_index: int) -> list[dict[str, int]]:
        """Committed seals after ``after_index``, oldest first, with each block's size."""
        commit = self.node.commit_index
        out = [
            {
                "shard": key[0],
                "hour": key[1],
                "part": key[2],
                "seal_index": info.seal_index,
                "bytes": info.bytes,
                "entries": info.entries - 1,
            }
            for key, info in list(self.log.blocks.items())
            if after_index < info.seal_index <= commit
        ]
        return sorted(out, key=lambda b: b["seal_index"])

    def block_parts(self, shard: int, hour: int, upto_index: int) -> list[tuple[int, int]]:
        """(part, bytes) of the sealed parts of (shard, hour) sealed at or before ``upto_index``."""
        require(upto_index <= self.node.commit_index, "parts asked past the commit index")
        return sorted(
            (key[2], info.bytes)
            for key, info in list(self.log.blocks.items())
            if key[0] == shard and key[1] == hour and 0 < info.seal_index <= upto_index
        )

    async def block_slices(self, key: BlockKey, slices: int) -> tuple[str, str, list[Any]]:
        """(node id, file, (offset, length) rows per slice) of a sealed block's committed
        data: map tasks placed on this replica's node read the slices from the file
        themselves, so the bytes never pass through this actor. Worked out on a thread:
        a block can hold hundreds of thousands of records, and this event loop
        replicates (a sync method of an async actor runs on its loop)."""
        block: BlockKey = (int(key[0]), int(key[1]), int(key[2]))
        info = self.log.blocks.get(block)
        require(info is not None and info.sealed, f"block {key} is not sealed here")
        upto = info.seal_index if info is not None else 0
        require(upto <= self.node.commit_index, f"the seal of {key} is not committed here")
        self.reads_served += slices
        path, spans = await asyncio.get_running_loop().run_in_executor(
            self.read_worker, self.log.block_slices, block, upto, slices
        )
        return ray.get_runtime_context().get_node_id(), path, spans

    def leader(self) -> tuple[int | None, int, str]:
        """(the master this replica knows of, its term, its own role)."""
        return self.node.leader, self.node.term, self.node.role.value

    async def status(self) -> dict[str, Any]:
        self._ensure_started()
        node = self.node
        open_blocks = [
            b for b in self.log.blocks.values() if not b.sealed and b.key[0] != CONTROL_SHARD
        ]
        is_master = node.role == Role.MASTER
        return {
            "group": self.group,
            "replica": self.replica,
            "role": node.role.value,
            "term": node.term,
            "leader": node.leader,
            "abstaining": node.abstain is not None,  # lost its state, not caught up yet
            "last_index": node.last_index,
            "commit_index": node.commit_index,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "dir": str(self.root),
            "reads_served": self.reads_served,
            "late_events": self.late_events,
            "sealed_pending": sum(
                1 for b in self.log.blocks.values() if b.seal_index > self.live.published_upto
            )
            if is_master
            else None,
            "blocks_open": len(open_blocks),
            "blocks_sealed": sum(1 for b in self.log.blocks.values() if b.sealed),
            "released_index": self.log.released_index,  # entries read from files only
            "match": {p: pr.match for p, pr in node.progress.items()} if is_master else None,
            "oldest_open_hour": self.blocks.oldest_open_hour() if is_master else None,
        }
