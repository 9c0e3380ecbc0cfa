"""One replica's copy of a group's replicated log, stored as one segment per block.

A block is (shard, hour, part): the events of one shard whose time falls in one hour,
in the order they were committed. ``part`` starts at 0 and grows when a block of an
hour that was already sealed receives late events. Entries carry one global index per
group, so the files of a replica together hold the log 1..last_index; recovery keeps
the longest gap-free prefix.

An append writes its entries to the write-ahead file ``wal.seg`` and fsyncs only that
one file, then writes each entry to its block's file: a proposal touches a file per
shard it holds, and fsyncs are what the disk runs out of first (the 2-core reference
machine managed about 1,500 a second). The block files reach the disk later: when
the write-ahead file passes about ``WAL_BYTES_MAX`` every block file written since the
last time is fsynced and the write-ahead file starts over (a checkpoint), and before
a divergent tail is cut. So whatever a block file holds past its last flush was
written by a batch that the write-ahead file holds, flushed. Recovery first cuts each
such file at its first bad record (the page cache writes pages back in any order, so
a lost page may lie before one that landed) and copies back every record of the
write-ahead file that the files lack (what the page cache had not written when the
machine stopped, and files whose directory entries it had not flushed: a new file's
entry is flushed at the next checkpoint), then proceeds from the block files alone,
and refuses to open if an entry flushed before the cycle is missing or damaged.

The write-ahead file is a run of batches, one per append: a header (magic, the
cycle's random id, payload length, record count, and a CRC of those and of the
records' own CRCs) and the append's records. Starting over (a new cycle) overwrites
the file's first bytes with an empty batch of a new id instead of emptying the file,
so later cycles write over space the file already has: their fdatasyncs record no
new size or block, and no zeros are written ahead again. Recovery takes the batches
of the first batch's cycle up to the first that is torn or of another cycle (what an
earlier, longer cycle left past the current one's end).

Memory does not grow with the log. Where each entry lies is kept in numpy arrays
(about 21 bytes an entry; a Python object per entry cost 325) and only for the
recent entries: once the processor has published the blocks that hold everything
up to some index (:meth:`ReplicaLog.release`), those entries are read, when at all
(catch-up from far behind, re-processing history), by scanning their block files.
Terms are kept as runs, one per term in the log.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from flowray.core.invariant import require
from flowray.storage import segment
from flowray.storage.durable import (
    fsync_path,
    make_dirs_durably,
    preallocate,
    start_writeback,
    trim_preallocation,
)
from flowray.storage.segment import CONTROL_SHARD, KIND_DATA, KIND_SEAL, Entry, RecordRef

BlockKey = tuple[int, int, int]  # (shard, hour since epoch, part)
FSYNC_THREADS = 4
WAL_NAME = "wal.seg"
# Fault injection (tests only): the file in a replica's directory that makes its
# write-ahead flushes hang, and the longest such a hang lasts.
HANG_FLUSH_FILE = "fault-hang-flush"
HANG_FLUSH_S_MAX = 60.0
WAL_BYTES_MAX = 32 * 1024 * 1024
# Each cycle checkpoints at a random size from WAL_BYTES_MAX less up to this share of
# it: the replicas of a group write the same bytes, and all six of a cluster's
# replicas checkpointed at the same moment, each fsync stalling its acknowledgements;
# spread out, a master finds a follower not checkpointing to make its majority with.
WAL_JITTER = 0.25
# A block file's new bytes are sent to the disk (not flushed) from this many on.
WRITEBACK_BYTES = 1024 * 1024
# Disk space reserved ahead of a growing block file (see _reserve), at most this much a
# file and, over the open files, about PREALLOC_TOTAL_BYTES: a reservation made while
# fewer files were open stays, so up to about twice that, or PREALLOC_MIN_BYTES a file
# with over a thousand open.
PREALLOC_BYTES = 8 * 1024 * 1024
PREALLOC_TOTAL_BYTES = 64 * 1024 * 1024
PREALLOC_MIN_BYTES = 64 * 1024
WAL_ZERO_AHEAD = 4 * 1024 * 1024  # zeros written ahead of the appends, at a time
# A write-ahead batch's header: magic, cycle id, payload bytes, records, check.
WAL_BATCH = struct.Struct("<4sQIII")
WAL_MAGIC = b"FRWB"
_ZEROS = bytes(1024 * 1024)
# Released entries are read (catch-up from far behind) this many at a time, from block
# files scanned once and kept for the next windows up to this many records.
COLD_WINDOW = 4096
COLD_CACHE_ENTRIES = 2_000_000


def hour_label(hour: int) -> str:
    return datetime.fromtimestamp(hour * 3600, tz=UTC).strftime("%Y-%m-%dT%H")


def block_path(root: Path, key: BlockKey) -> Path:
    shard, hour, part = key
    return root / "blocks" / f"s{shard:04d}" / f"{hour_label(hour)}.h{hour}.p{part:04d}.seg"


def wal_batch(cycle: int, frames: list[bytes]) -> bytes:
    """One write-ahead batch: its header, then ``frames`` (encoded records)."""
    payload = b"".join(frames)
    crcs = b"".join(segment.record_crc(frame) for frame in frames)
    return _wal_header(cycle, len(payload), len(frames), crcs) + payload


def _wal_header(cycle: int, length: int, count: int, crcs: bytes) -> bytes:
    fields = struct.pack("<QII", cycle, length, count)
    return WAL_BATCH.pack(WAL_MAGIC, cycle, length, count, zlib.crc32(crcs, zlib.crc32(fields)))


def wal_batches(data: bytes) -> list[tuple[int, list[RecordRef]]]:
    """(offset, records) of each whole batch of the write-ahead file's current cycle
    (the first batch's), record offsets in ``data`` too."""
    out: list[tuple[int, list[RecordRef]]] = []
    pos, cycle = 0, None
    while pos + WAL_BATCH.size <= len(data):
        magic, batch_cycle, length, count, _check = WAL_BATCH.unpack_from(data, pos)
        start, end = pos + WAL_BATCH.size, pos + WAL_BATCH.size + length
        if magic != WAL_MAGIC or (cycle is not None and batch_cycle != cycle) or end > len(data):
            break
        refs, good = segment.intact_prefix(data, start, end)
        if good != end or len(refs) != count:
            break  # torn, or a header over an older cycle's records
        crcs = b"".join(segment.record_crc(data, r.offset) for r in refs)
        if _wal_header(batch_cycle, length, count, crcs) != data[pos:start]:
            break
        out.append((pos, refs))
        pos, cycle = end, batch_cycle
    return out


@dataclass
class BlockInfo:
    """What the log says about one block: size and whether (and where) it was sealed."""

    key: BlockKey
    bytes: int = 0
    entries: int = 0
    first_index: int = 0
    last_index: int = 0
    seal_index: int = 0  # 0 while the block is open
    released: bool = field(default=False, compare=False)  # published: read from its file

    @property
    def sealed(self) -> bool:
        return self.seal_index > 0


class _Scanned:
    """A block file's records as arrays (about 29 bytes a record), ordered by index as
    they are in the file."""

    def __init__(self, key: BlockKey, refs: list[RecordRef]) -> None:
        self.key = key
        n = len(refs)
        self.index = np.fromiter((r.index for r in refs), np.int64, n)
        self.term = np.fromiter((r.term for r in refs), np.int64, n)
        self.offset = np.fromiter((r.offset for r in refs), np.int64, n)
        self.length = np.fromiter((r.length for r in refs), np.int32, n)
        self.kind = np.fromiter((r.kind for r in refs), np.int8, n)

    def ref(self, at: int) -> RecordRef:
        shard, hour, part = self.key
        return RecordRef(
            int(self.offset[at]),
            int(self.length[at]),
            int(self.kind[at]),
            int(self.term[at]),
            int(self.index[at]),
            shard,
            hour,
            part,
        )


_NO_SPANS = np.zeros((0, 2), np.int64)


class _Recent:
    """Where each recent entry lies: block id, offset, payload length and kind, in
    growable numpy arrays; position 0 holds the entry after the released prefix."""

    def __init__(self, capacity: int = 1024) -> None:
        self.n = 0
        self.block = np.empty(capacity, np.int32)
        self.offset = np.empty(capacity, np.int64)
        self.length = np.empty(capacity, np.int32)
        self.kind = np.empty(capacity, np.int8)

    def append(self, block: int, offset: int, length: int, kind: int) -> None:
        if self.n == len(self.block):
            self._resize(2 * self.n)
        n = self.n
        self.block[n], self.offset[n], self.length[n], self.kind[n] = block, offset, length, kind
        self.n = n + 1

    def cut(self, n: int) -> None:
        """Keep the first ``n`` entries."""
        require(0 <= n <= self.n, f"cut to {n} of {self.n}")
        self.n = n

    def drop_front(self, k: int) -> None:
        """Forget the first ``k`` entries (released); give the space back."""
        require(0 <= k <= self.n, f"drop {k} of {self.n}")
        self._resize(max(1024, 2 * (self.n - k)), start=k)

    def _resize(self, capacity: int, start: int = 0) -> None:
        """New arrays of ``capacity`` holding entries ``start`` .. n-1."""
        keep = self.n - start
        for name in ("block", "offset", "length", "kind"):
            old = getattr(self, name)
            new = np.empty(capacity, old.dtype)
            new[:keep] = old[start : self.n]
            setattr(self, name, new)
        self.n = keep


class ReplicaLog:
    """Append, truncate and read one replica's log; durable when a call returns."""

    def __init__(self, root: Path, fault_injection: bool = False) -> None:
        self.root = root
        # Tests make this replica's disk hang by creating this file (see
        # _hang_while_faulted); None in production, where nothing is looked up.
        self.hang_flush_file = root / HANG_FLUSH_FILE if fault_injection else None
        make_dirs_durably(root / "blocks")
        # Entry i's term is _run_terms[k] for the last run k with _run_starts[k] <= i.
        self._run_starts: list[int] = []
        self._run_terms: list[int] = []
        self._last = 0  # the last entry's index
        self._base = 0  # entries up to here are released: no per-entry record in memory
        self._recent = _Recent()  # entries _base + 1 .. _last
        self._ids: dict[BlockKey, int] = {}  # a block's id in _Recent.block
        self._keys: list[BlockKey] = []
        self.blocks: dict[BlockKey, BlockInfo] = {}
        self._cold: OrderedDict[BlockKey, _Scanned] = OrderedDict()  # see _cold_refs
        self._cold_lock = threading.Lock()
        self._cold_entries = 0
        self._fds: dict[BlockKey, int] = {}
        # Per open block file, where the bytes begin whose disk write is not started.
        self._pending_writeback: dict[BlockKey, int] = {}
        # Per open block file, where the space reserved past its end ends (_reserve).
        self._reserved: dict[BlockKey, int] = {}
        self._reserving = True  # until the file system refuses
        # The replica's event loop reads terms while a worker thread appends: one lock.
        self._lock = threading.RLock()
        self._syncer: ThreadPoolExecutor | None = None
        self._wal_path = root / WAL_NAME
        self._unsynced: set[BlockKey] = set()  # block files written since the checkpoint
        self._created: set[BlockKey] = set()  # block files created since the checkpoint
        # Recovered before the new cycle starts: a log refused (_recover) keeps its
        # write-ahead file, so it is refused again on every open, not cut the next time.
        self._wal_fd = -1
        self._wal_bytes = 0  # where the next batch goes
        self._wal_size = 0  # zeros or older cycles past it
        self._wal_cycle = 0
        self._wal_limit = WAL_BYTES_MAX  # a checkpoint's size, drawn for each cycle
        try:
            self._recover(self._replay_wal())
            created = not self._wal_path.exists()
            self._wal_fd = os.open(self._wal_path, os.O_RDWR | os.O_CREAT, 0o644)
            if created:
                fsync_path(root)
            self._wal_size = os.fstat(self._wal_fd).st_size
            self._start_wal()
        except BaseException:
            self._release_resources()
            raise

    # ---- state ---------------------------------------------------------------
    @property
    def last_index(self) -> int:
        return self._last

    @property
    def last_term(self) -> int:
        with self._lock:
            return self._run_terms[-1] if self._run_terms else 0

    @property
    def released_index(self) -> int:
        """Entries up to this index are read from their block files (see release)."""
        return self._base

    def term_at(self, index: int) -> int:
        """Term of entry ``index``; 0 for index 0 (the empty prefix)."""
        with self._lock:
            require(0 <= index <= self._last, f"no entry {index} (last {self._last})")
            if index == 0:
                return 0
            return self._run_terms[bisect.bisect_right(self._run_starts, index) - 1]

    # ---- recovery ------------------------------------------------------------
    def _replay_wal(self) -> int:
        """Bring the block files the write-ahead file names up to it, and return the
        index below which every entry was flushed before its cycle began (0 if none).

        Everything written to such a file since the checkpoint that began the cycle is
        in the write-ahead file (an append writes block files only once its batch is
        flushed), so a file is cut at its first bad record, whatever follows it (the
        page cache writes pages back in any order: a lost page may lie before one that
        landed), and the records it then lacks are copied back from the write-ahead
        file. Every block file it names, and their directories, are then fsynced: the
        new cycle that the constructor starts drops the only flushed copy of those
        records, and after a restart of the process alone a file may hold them in the
        page cache only (see _append_unlocked).

        The entries of the cycle have consecutive indices (a cut starts a new cycle),
        so every entry below its first was flushed at the checkpoint: _recover refuses
        a log that lacks one of them, rather than cutting acknowledged entries."""
        if not self._wal_path.exists():
            return 0
        data = self._wal_path.read_bytes()
        logged = [ref for _offset, refs in wal_batches(data) for ref in refs]
        if not logged:
            return 0
        flushed = logged[0].index - 1
        by_block: dict[BlockKey, list[RecordRef]] = {}
        for ref in logged:
            by_block.setdefault((ref.shard, ref.hour, ref.part), []).append(ref)
        for key, refs in sorted(by_block.items()):
            path = block_path(self.root, key)
            held = self._cut_at_first_bad(path, flushed) if path.exists() else []
            last = held[-1].index if held else 0
            have = {ref.index for ref in held}
            missing = [ref for ref in refs if ref.index not in have]
            if missing and missing[0].index <= last:
                raise segment.CorruptSegment(
                    f"{path}: entry {missing[0].index} is missing before entry {last}"
                )
            fd, _created = self._open(key)
            for entry in segment.entries_in(data, missing, str(self._wal_path)):
                os.write(fd, segment.encode(entry))
        self._fsync(list(self._fds.values()))
        self._fsync_dirs(self._fds)
        for key in list(self._fds):
            self._close(key)
        return flushed

    @staticmethod
    def _cut_at_first_bad(path: Path, flushed: int) -> list[RecordRef]:
        """The file's records up to its first bad one; the rest is cut (not flushed:
        the caller fsyncs), unless an intact record after it is one of the entries up
        to ``flushed``: then the bad one is damage to flushed data, and the file is
        refused untouched."""
        data = path.read_bytes()
        refs, good = segment.intact_prefix(data)
        if good < len(data):
            after = [ref.index for ref in segment.intact_after(data, good) if ref.index <= flushed]
            if after:
                raise segment.CorruptSegment(
                    f"{path}: a bad record at byte {good} before flushed entry {after[0]}"
                )
            with open(path, "r+b") as fh:
                fh.truncate(good)
        return refs

    @staticmethod
    def _hang_while_faulted(path: Path) -> None:
        """A flush that hangs, as on a full or failing disk: while ``path`` exists (at
        most HANG_FLUSH_S_MAX), the append waits before its fdatasync."""
        deadline = time.monotonic() + HANG_FLUSH_S_MAX
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _start_wal(self) -> None:
        """Start a new cycle: an empty batch with a new random id at the file's start,
        flushed, so no batch of an earlier cycle is replayed after a crash.

        Appends overwrite space the file already has (zeros written ahead of them,
        WAL_ZERO_AHEAD at a time, or earlier cycles' batches), so their fdatasync has
        no file size or block allocation to record: about half the time of an append
        and fsync on the reference machine (0.17-0.20 ms against 0.35-0.43).
        """
        self._wal_cycle = int.from_bytes(os.urandom(8), "little")
        # from the cycle's own random id: no process-wide seed can line replicas up
        self._wal_limit = WAL_BYTES_MAX - self._wal_cycle % (int(WAL_BYTES_MAX * WAL_JITTER) + 1)
        start = wal_batch(self._wal_cycle, [])
        if len(start) > self._wal_size:
            self._zero_wal_to(len(start) + WAL_ZERO_AHEAD)
        os.pwrite(self._wal_fd, start, 0)
        os.fdatasync(self._wal_fd)
        self._wal_bytes = len(start)

    def _zero_wal_to(self, size: int) -> None:
        """Grow the write-ahead file to ``size`` with zeros, and flush its new size."""
        while self._wal_size < size:
            chunk = _ZEROS[: size - self._wal_size]
            self._wal_size += os.pwrite(self._wal_fd, chunk, self._wal_size)
        os.fsync(self._wal_fd)

    def _recover(self, flushed: int) -> None:
        """Track the longest gap-free run of entries in the block files and cut the
        rest (entries of a batch that was never flushed); entries up to ``flushed``
        were flushed, and a log that lacks one of them is refused, not cut."""
        refs: list[tuple[RecordRef, BlockKey]] = []
        for path in sorted((self.root / "blocks").glob("s*/*.seg")):
            for ref in segment.recover(path):
                refs.append((ref, (ref.shard, ref.hour, ref.part)))
            try:  # space reserved before a crash, or before the file was sealed
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # only space is at stake: a file that cannot be opened so keeps it
            try:
                trim_preallocation(fd)
            finally:
                os.close(fd)
        refs.sort(key=lambda pair: pair[0].index)
        keep = 0
        for ref, _key in refs:
            if ref.index != keep + 1:
                break
            keep += 1
        if keep < flushed:
            raise segment.CorruptSegment(
                f"{self.root}: entry {keep + 1} is missing or damaged, though entries "
                f"up to {flushed} were flushed"
            )
        for ref, key in refs[:keep]:
            self._track(ref, key)
        if keep < len(refs):
            self._cut_files_after(keep)

    def _track(self, ref: RecordRef, key: BlockKey) -> None:
        require(ref.index == self._last + 1, "entries must be tracked in index order")
        require(ref.term >= self.last_term, "terms never decrease along the log")
        info = self.blocks.get(key)
        require(
            info is None or not info.sealed, f"entry {ref.index} appended to sealed block {key}"
        )
        if ref.term != self.last_term:
            self._run_starts.append(ref.index)
            self._run_terms.append(ref.term)
        if info is None:
            info = self.blocks[key] = BlockInfo(key, first_index=ref.index)
        block = self._ids.get(key)
        if block is None:
            block = self._ids[key] = len(self._keys)
            self._keys.append(key)
        self._recent.append(block, ref.offset, ref.length, ref.kind)
        self._last = ref.index
        info.bytes += segment.HEADER_BYTES + ref.length
        info.entries += 1
        info.last_index = ref.index
        if ref.kind == KIND_SEAL:
            info.seal_index = ref.index

    def _cold_refs(self, key: BlockKey) -> _Scanned:
        """A released block's records, scanned from its file once and kept (the least
        recently used go beyond COLD_CACHE_ENTRIES records): a released block is sealed
        by a committed seal, so its file no longer changes. The control block, which
        still grows, is scanned afresh each time (it holds a no-op per term).

        Safe with or without ``_lock`` held (block_slices scans without it): the cache
        is changed under ``_cold_lock``, and the scan of an unchanging file needs no
        lock (two callers may both scan a block the first time)."""
        if key[0] == CONTROL_SHARD:
            return _Scanned(key, self._scan_block(key))
        with self._cold_lock:
            hit = self._cold.get(key)
            if hit is not None:
                self._cold.move_to_end(key)
                return hit
        scanned = _Scanned(key, self._scan_block(key))
        with self._cold_lock:
            if key not in self._cold:
                self._cold[key] = scanned
                self._cold_entries += len(scanned.index)
            while self._cold_entries > COLD_CACHE_ENTRIES and len(self._cold) > 1:
                _key, old = self._cold.popitem(last=False)
                self._cold_entries -= len(old.index)
        return scanned

    def _scan_block(self, key: BlockKey) -> list[RecordRef]:
        """Every record of a block's file (which holds no torn tail after start-up)."""
        refs, _good = segment.scan(block_path(self.root, key).read_bytes())
        return refs

    def _ref(self, index: int) -> RecordRef:
        """Where a recent entry lies."""
        require(self._base < index <= self._last, f"entry {index} is not a recent one")
        at = index - self._base - 1
        r = self._recent
        shard, hour, part = self._keys[int(r.block[at])]
        return RecordRef(
            int(r.offset[at]),
            int(r.length[at]),
            int(r.kind[at]),
            self.term_at(index),
            index,
            shard,
            hour,
            part,
        )

    def _block_refs(self, key: BlockKey, upto_index: int) -> list[RecordRef]:
        """The records of a block up to ``upto_index``: a recent block's from memory, a
        released one's by scanning its file, once while the released index stays (a
        processing job asks for a block's records, and every job that re-processes an
        hour with late parts asks for all of its parts again)."""
        info = self.blocks.get(key)
        if info is None:
            return []
        upto = min(upto_index, info.last_index)
        if info.released:  # sealed by a committed seal: its file no longer changes
            scanned = self._cold_refs(key)
            end = int(np.searchsorted(scanned.index, upto, side="right"))
            return [scanned.ref(i) for i in range(end)]
        if info.first_index <= self._base:  # the control block: it still grows
            return [r for r in self._scan_block(key) if r.index <= upto]
        r = self._recent
        at = np.flatnonzero(r.block[: r.n] == self._ids[key])
        return [self._ref(int(i) + self._base + 1) for i in at if int(i) + self._base + 1 <= upto]

    # ---- writes --------------------------------------------------------------
    # Long: the steps of one append in the order durability needs (frame, write-ahead
    # write and flush, then block files); split up, that order would be harder to see.
    def _append_unlocked(self, entries: Iterable[Entry]) -> int:
        """Append entries that extend the log; durable when it returns (the write-ahead
        file holds them, fdatasynced).

        A block file created here gets its directory entry flushed only at the next
        checkpoint: until then the write-ahead file holds every record of it, and
        recovery recreates a file whose entry was lost. A directory's fsync forces an
        ext4 journal commit; kept off the acknowledgement path, nothing but the
        write-ahead fdatasync is on it (a micro-benchmark of appends that open new
        files measured no difference either way: see BENCHMARKS.md).

        Returns the bytes written. Entries must continue the log without a gap.
        """
        entries = list(entries)
        self._check_append(entries)
        written = 0
        frames: list[bytes] = []
        spans: dict[BlockKey, list[int]] = {}  # [first offset, end] written per file
        per_file: dict[BlockKey, list[bytes]] = {}
        for entry in entries:
            key = entry.block
            fd = self._fds.get(key)
            if fd is None:
                fd, created = self._open(key)
                if created:
                    self._created.add(key)
            frame = segment.encode(entry)
            span = spans.get(key)
            if span is None:
                span = spans[key] = [os.lseek(fd, 0, os.SEEK_END)] * 2
                per_file[key] = []
            offset = span[1]
            span[1] += len(frame)
            per_file[key].append(frame)
            ref = RecordRef(
                offset,
                len(entry.payload),
                entry.kind,
                entry.term,
                entry.index,
                entry.shard,
                entry.hour,
                entry.part,
            )
            self._track(ref, key)
            frames.append(frame)
            written += len(frame)
        wal = wal_batch(self._wal_cycle, frames)
        if self._wal_bytes + len(wal) > self._wal_size:
            self._zero_wal_to(self._wal_bytes + len(wal) + WAL_ZERO_AHEAD)
        written_here = os.pwrite(self._wal_fd, wal, self._wal_bytes)
        require(written_here == len(wal), "a short write to the write-ahead file")
        if self.hang_flush_file is not None:
            self._hang_while_faulted(self.hang_flush_file)
        os.fdatasync(self._wal_fd)  # the one flush an append waits for
        self._wal_bytes += len(wal)
        # Only now the block files: none holds a record whose batch the write-ahead
        # file may not have, so what a crash leaves of their unflushed bytes (pages
        # written back in any order, with holes) is always behind a record the
        # write-ahead file names, and recovery rewrites it (see _replay_wal).
        self._unsynced |= spans.keys()  # first: a checkpoint after a failed write flushes them
        for key, parts in per_file.items():
            chunk = parts[0] if len(parts) == 1 else b"".join(parts)
            wrote = os.write(self._fds[key], chunk)
            require(wrote == len(chunk), f"a short write to block file {key}")
        self._write_back(spans)
        self._reserve(spans)
        for key in spans:
            if self.blocks[key].sealed:
                self._close(key)
        if self._wal_bytes > self._wal_limit:
            self._checkpoint()
        return written

    def _write_back(self, spans: dict[BlockKey, list[int]]) -> None:
        """Start the disk writes of block files' new bytes once a file has
        WRITEBACK_BYTES of them (or is sealed), after the append's own flush. At the
        fleet rate the kernel's flusher otherwise wrote 30 s of every block file at
        once, and checkpoints fsynced 20 s of them: the write-ahead fdatasyncs queued
        behind those bursts, and acknowledgements took up to 0.55 s."""
        # With many open files a file may not reach WRITEBACK_BYTES before a checkpoint
        # fsyncs it: then hand over less at a time, so the checkpoint finds little.
        step = min(WRITEBACK_BYTES, WAL_BYTES_MAX // (2 * max(1, len(self._fds))))
        for key, (first, end) in spans.items():
            start = min(self._pending_writeback.get(key, first), first)  # first: after a cut
            if end - start >= step or self.blocks[key].sealed:
                start_writeback(self._fds[key], start, end - start)
                self._pending_writeback[key] = end
            else:
                self._pending_writeback[key] = start

    def _reserve(self, spans: dict[BlockKey, list[int]]) -> None:
        """Keep disk space reserved past the end of each growing block file (see
        durable.preallocate), up to PREALLOC_BYTES ahead, less with many open files;
        given back when the file is closed (sealed, cut or the log closed) or, after a
        crash, by recovery. Appends then write into extents that exist: at the fleet
        rate the block allocations of delayed writes, committed by ext4's journal,
        held every replica's write-ahead fdatasync 50-130 ms every few seconds."""
        if not self._reserving:
            return
        ahead = max(
            PREALLOC_MIN_BYTES, min(PREALLOC_BYTES, PREALLOC_TOTAL_BYTES // max(1, len(self._fds)))
        )
        for key, (_first, end) in spans.items():
            fd = self._fds.get(key)
            reserved = self._reserved.get(key, 0)
            if fd is None or self.blocks[key].sealed or end + ahead // 2 <= reserved:
                continue
            start = max(reserved, end)
            refused = preallocate(fd, start, end + ahead - start)
            if refused in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._reserving = False  # not supported here: do not ask again
                return
            # Refused otherwise (the disk full, say): asked again after as many bytes.
            self._reserved[key] = end + ahead

    def _checkpoint(self) -> None:
        """fsync every block file written since the last checkpoint, then empty the
        write-ahead file: everything it held is now in the block files, on disk."""
        fds, opened = [], []
        for key in self._unsynced:
            fd = self._fds.get(key)
            if fd is None:  # sealed and closed since
                fd = os.open(block_path(self.root, key), os.O_RDONLY)
                opened.append(fd)
            fds.append(fd)
        try:
            if fds:
                self._fsync(fds)
        finally:
            for fd in opened:
                os.close(fd)
        # New files' directory entries too, only now (see _append_unlocked): the cycle
        # about to start no longer holds their records.
        if self._created:
            self._fsync_dirs(self._created)
        self._start_wal()
        self._unsynced = set()
        self._created = set()
        self._pending_writeback.clear()

    def _fsync(self, fds: list[int]) -> None:
        """fsync the files together (checkpoints, recovery): the disk flushes concurrent
        requests in one go, so four files took 1.2-1.4 ms this way against 1.7-1.9 ms
        one after another on the reference machine."""
        if len(fds) == 1:
            os.fsync(fds[0])
            return
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
        list(self._syncer.map(os.fsync, fds))  # raises the first failure

    def _check_append(self, entries: list[Entry]) -> None:
        """Refuse a bad batch before any byte of it reaches a file."""
        index, term = self.last_index, self.last_term
        sealed_now: set[BlockKey] = set()
        for entry in entries:
            require(entry.index == index + 1, f"gap before entry {entry.index}")
            require(entry.term >= term, f"entry {entry.index} has a lower term than the log")
            info = self.blocks.get(entry.block)
            require(
                entry.block not in sealed_now and not (info is not None and info.sealed),
                f"entry {entry.index} appended to sealed block {entry.block}",
            )
            if entry.kind == KIND_SEAL:
                sealed_now.add(entry.block)
            index, term = entry.index, entry.term

    def _open(self, key: BlockKey) -> tuple[int, bool]:
        path = block_path(self.root, key)
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._fds[key] = fd
        return fd, created

    def _close(self, key: BlockKey) -> None:
        self._pending_writeback.pop(key, None)
        fd = self._fds.pop(key, None)
        if fd is None:
            return
        try:
            if self._reserved.pop(key, None) is not None:
                trim_preallocation(fd)
        finally:
            os.close(fd)

    def _fsync_dirs(self, keys: Iterable[BlockKey]) -> None:
        dirs = {block_path(self.root, key).parent for key in keys}
        dirs.add(self.root / "blocks")
        for d in dirs:
            fsync_path(d)

    def _truncate_after_unlocked(self, index: int) -> None:
        """Drop entries after ``index`` (an uncommitted divergent tail)."""
        require(0 <= index <= self.last_index, f"cannot truncate after {index}")
        if index == self.last_index:
            return
        require(index >= self._base, f"cannot cut released entries (after {index})")
        r, keep = self._recent, index - self._base
        for block in set(r.block[keep : r.n].tolist()):
            key = self._keys[block]
            require(not self.blocks[key].released, f"a cut would reach released block {key}")
        # The write-ahead file must not bring the cut entries back after a crash.
        self._checkpoint()
        self._cut_files_after(index)
        touched = set()
        for pos in range(r.n - 1, keep - 1, -1):
            key = self._keys[int(r.block[pos])]
            info = self.blocks[key]
            info.bytes -= segment.HEADER_BYTES + int(r.length[pos])
            info.entries -= 1
            if info.seal_index == self._base + pos + 1:
                info.seal_index = 0
            touched.add(key)
        r.cut(keep)
        for key in touched:
            info = self.blocks[key]
            if info.entries == 0:
                del self.blocks[key]
                continue
            at = np.flatnonzero(r.block[: r.n] == self._ids[key])
            if len(at):
                info.last_index = int(at[-1]) + self._base + 1
            else:  # the control block: what is left of it is released (its file is cut)
                info.last_index = self._scan_block(key)[-1].index
        self._last = index
        while self._run_starts and self._run_starts[-1] > index:
            self._run_starts.pop()
            self._run_terms.pop()

    def _cut_files_after(self, index: int) -> None:
        removed: set[BlockKey] = set()
        for path in sorted((self.root / "blocks").glob("s*/*.seg")):
            refs = segment.recover(path)
            cut = next((r.offset for r in refs if r.index > index), None)
            if cut is None:
                continue
            key = (refs[0].shard, refs[0].hour, refs[0].part)
            self._close(key)
            if cut == 0:
                path.unlink()
                removed.add(key)
                continue
            with open(path, "r+b") as fh:
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
        if removed:  # else a crash could bring a removed file, with the cut tail, back
            self._fsync_dirs(removed)

    # ---- reads ---------------------------------------------------------------
    def _read_unlocked(self, from_index: int, bytes_max: int) -> list[Entry]:
        """Entries from ``from_index`` on, at least one, then up to ``bytes_max`` bytes."""
        out: list[Entry] = []
        size = 0
        fds: dict[BlockKey, int] = {}
        try:
            for ref in self._refs_from(from_index):
                key = (ref.shard, ref.hour, ref.part)
                fd = fds.get(key)
                if fd is None:
                    fd = fds[key] = os.open(block_path(self.root, key), os.O_RDONLY)
                entry = segment.read_one(fd, ref)
                out.append(entry)
                size += len(entry.payload)
                if size >= bytes_max:
                    break
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def _refs_from(self, from_index: int) -> Iterable[RecordRef]:
        """Records from ``from_index`` to the end: released ones by scanning the files of
        the blocks that hold them (a replica catching up from far behind), then the
        recent ones from memory."""
        lo = from_index
        while lo <= self._base:  # a window of released entries at a time
            hi = min(self._base, lo + COLD_WINDOW - 1)
            cold: list[RecordRef] = []
            for key, info in self.blocks.items():
                if info.first_index <= hi and info.last_index >= lo:
                    refs = self._cold_refs(key)
                    at = np.searchsorted(refs.index, [lo, hi + 1])
                    cold += (refs.ref(int(i)) for i in range(int(at[0]), int(at[1])))
            cold.sort(key=lambda r: r.index)
            require(
                [r.index for r in cold] == list(range(lo, hi + 1)),
                "the block files lack released entries",
            )
            yield from cold
            lo = hi + 1
        for index in range(max(from_index, self._base + 1), self._last + 1):
            yield self._ref(index)

    def _release_unlocked(self, published_seal_index: int, committed_index: int) -> int:
        """Forget where each entry up to some index lies, once every block holding one
        is published (its seal committed, at or before ``published_seal_index``) or is
        the control block. ``committed_index``: entries up to it are committed and on
        this replica's disk as committed (no cut of them is pending). Returns the new
        released index."""
        upto = min(published_seal_index, committed_index)
        for info in self.blocks.values():
            if 0 < info.seal_index <= upto:
                info.released = True  # sealed by a committed seal: never cut
        held = [
            info.first_index
            for info in self.blocks.values()
            if not info.released and info.key[0] != CONTROL_SHARD
        ]  # no entry of these may be released; the control block's no-ops only up to
        # committed_index, as any entry
        base = min([committed_index, self._last, *(first - 1 for first in held)])
        if base > self._base:
            self._recent.drop_front(base - self._base)
            self._base = base
        return self._base

    def append(self, entries: Iterable[Entry]) -> int:
        """Append entries that extend the log; durable when it returns (see
        _append_unlocked).

        Returns the bytes written. Entries must continue the log without a gap.
        """
        with self._lock:
            return self._append_unlocked(entries)

    def truncate_after(self, index: int) -> None:
        """Drop entries after ``index`` (an uncommitted divergent tail)."""
        with self._lock:
            self._truncate_after_unlocked(index)

    def read(self, from_index: int, bytes_max: int) -> list[Entry]:
        """Entries from ``from_index`` on, at least one, then up to ``bytes_max`` bytes."""
        with self._lock:
            return self._read_unlocked(from_index, bytes_max)

    def release(self, published_seal_index: int, commit_index: int) -> int:
        """The processor published every block sealed at or before
        ``published_seal_index``: forget where their entries lie, up to the first
        entry of a block not yet published (see _release_unlocked)."""
        with self._lock:
            return self._release_unlocked(published_seal_index, commit_index)

    def block_payloads(
        self, key: BlockKey, upto_index: int, slice_no: int = 0, slices: int = 1
    ) -> list[bytes]:
        """Data payloads of a block up to ``upto_index`` (committed), one slice of them.

        Slice ``k`` of ``n`` holds the block's data entries ``k, k+n, k+2n, ...``, so
        map tasks can split a block without reading what they do not process.
        """
        require(0 <= slice_no < slices, f"slice {slice_no} of {slices}")
        with self._lock:
            refs = [r for r in self._block_refs(key, upto_index) if r.kind == KIND_DATA]
        if not refs:
            return []
        # Read outside the lock, so appends go on meanwhile: committed records are
        # never rewritten, and only an uncommitted tail is ever cut.
        spans = [(r.offset, r.length) for r in refs[slice_no::slices]]
        return segment.read_payloads(block_path(self.root, key), spans)

    def block_slices(
        self, key: BlockKey, upto_index: int, slices: int
    ) -> tuple[str, list[np.ndarray]]:
        """Where a block's committed data records lie, split into ``slices`` slices
        (slice ``k`` holds records ``k, k+n, ...``), each an array of (offset, payload
        length) rows: for readers on this machine that read the file themselves (see
        segment.read_payloads).

        Arrays, not a record object per entry: a block of small pieces holds hundreds of
        thousands of records, and building, pickling and unpickling their objects cost
        about 6 µs a record. The lock is held only to copy a recent block's columns; a
        released block's file no longer changes, so it is scanned outside it."""
        require(slices >= 1, f"{slices} slices")
        with self._lock:
            info = self.blocks.get(key)
            if info is None:
                return str(block_path(self.root, key)), [_NO_SPANS] * slices
            upto = min(upto_index, info.last_index)
            released = info.released
            if not released and info.first_index <= self._base:  # as _block_refs does
                refs = [r for r in self._block_refs(key, upto) if r.kind == KIND_DATA]
                spans = np.array([(r.offset, r.length) for r in refs], np.int64).reshape(-1, 2)
            elif not released:
                r = self._recent
                at = np.flatnonzero(r.block[: r.n] == self._ids[key])
                at = at[(at + self._base + 1 <= upto) & (r.kind[at] == KIND_DATA)]
                spans = np.column_stack((r.offset[at], r.length[at].astype(np.int64)))
        if released:
            scanned = self._cold_refs(key)
            end = int(np.searchsorted(scanned.index, upto, side="right"))
            data = scanned.kind[:end] == KIND_DATA
            spans = np.column_stack(
                (scanned.offset[:end][data], scanned.length[:end][data].astype(np.int64))
            )
        return str(block_path(self.root, key)), [spans[k::slices] for k in range(slices)]

    def close(self) -> None:
        for key in list(self._fds):
            self._close(key)
        os.close(self._wal_fd)
        if self._syncer is not None:
            self._syncer.shutdown(wait=False)

    def _release_resources(self) -> None:
        """After a failed open: close the files it opened, stop the fsync threads."""
        for fd in [*self._fds.values(), self._wal_fd]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds.clear()
        self._wal_fd = -1
        if self._syncer is not None:
            self._syncer.shutdown(wait=False)
