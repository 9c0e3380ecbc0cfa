"""Crash simulation for flowray.storage.replica_log: every acknowledged entry survives.

The model of the disk: a directory keeps its entries as of its last fsync, and each
entry created or removed since is kept or lost at random; a file keeps its last
fsynced bytes plus a random prefix of what was written after or, in the ``pages``
runs, half the time any of the pages written since (the page cache writes pages back
in any order), with a size between the flushed and the written one. ``os.fsync``,
``os.fdatasync`` and ``os.unlink`` are intercepted to record what is durable. Each
run is a few generations of random appends (data, seals, control no-ops), cuts and
restarts (closed, or the process dying without close()), each ending in a crash at a
random fsync (recovery itself included) and a reopen, after which the log must hold
every entry that ``append`` returned for, unchanged. Linux only (it reads /proc).
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from flowray.storage import replica_log
from flowray.storage.replica_log import ReplicaLog
from flowray.storage.segment import KIND_SEAL, Entry
from tests.test_replica_log import HOUR, data, noop, seal

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
CASES = int(os.environ.get("CRASH_CASES", "40"))


class Crash(Exception):
    pass


class Disk:
    """What would survive a power cut, recorded at every fsync."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, rng: random.Random, pages: bool = False
    ) -> None:
        self.rng, self.pages = rng, pages
        self.dirs: dict[str, dict[str, Any]] = {}  # directory -> {name: inode} as flushed
        self.data: dict[Any, bytes] = {}  # inode -> bytes as flushed
        self.syncs, self.crash_at, self.dead = 0, None, 0
        unlink = os.unlink

        def on_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            if args or kwargs:  # shutil.rmtree's dir_fd calls
                unlink(path, *args, **kwargs)
                return
            # A removed inode keeps its flushed bytes under a name of its own, for a
            # directory entry that may come back.
            inode = os.stat(path).st_ino
            self.dead += 1
            self.data[("removed", self.dead)] = self.data.pop(inode, b"")
            for entries in self.dirs.values():
                for name, value in list(entries.items()):
                    if value == inode:
                        entries[name] = ("removed", self.dead)
            unlink(path)

        monkeypatch.setattr(os, "fsync", self.sync)
        monkeypatch.setattr(os, "fdatasync", self.sync)
        monkeypatch.setattr(os, "unlink", on_unlink)

    def sync(self, fd: int) -> None:
        self.syncs += 1
        if self.crash_at is not None and self.syncs >= self.crash_at:
            raise Crash
        st, path = os.fstat(fd), os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(st.st_mode):
            self.dirs[path] = {e.name: e.inode() for e in os.scandir(path)}
        else:
            self.data[st.st_ino] = Path(f"/proc/self/fd/{fd}").read_bytes()

    def survivor(self, old: bytes, current: bytes) -> bytes:
        """A file's bytes after the crash: its flushed ``old`` bytes with a prefix of
        what was written since, or (``pages``) any of the pages written since."""
        if self.pages and self.rng.random() < 0.5:
            return pages_kept(self.rng, old, current)
        keep = self.rng.choice([0, len(current), self.rng.randint(0, len(current))])
        return current[:keep] + old[keep:]

    def crash(self, root: Path) -> None:
        """Replace the tree under root by one that a power cut could have left."""
        tree: dict[Path, bytes | None] = {}  # None: a directory

        def walk(d: Path) -> None:
            now = {e.name: e for e in os.scandir(d)}
            flushed = self.dirs.get(str(d), {})
            for name in sorted(set(now) | set(flushed)):
                entry, path = now.get(name), d / name
                pick = self.rng.choice([flushed.get(name), entry and entry.inode()])
                if pick is None:
                    continue  # the entry is not there after the crash
                live = entry is not None and entry.inode() == pick
                if live and entry is not None and entry.is_dir():
                    tree[path] = None
                    walk(path)
                    continue
                old = self.data.get(pick, b"")
                current = path.read_bytes() if live else old
                tree[path] = self.survivor(old, current)

        walk(root)
        shutil.rmtree(root)
        root.mkdir()
        for path, content in sorted(tree.items(), key=lambda item: len(item[0].parts)):
            if content is None:
                path.mkdir()
            else:
                path.write_bytes(content)
        self.dirs, self.data, self.crash_at = {}, {}, None
        for d, _subdirs, files in os.walk(root):  # all of it is on disk now
            self.dirs[d] = {e.name: e.inode() for e in os.scandir(d)}
            for f in files:
                self.data[os.stat(Path(d, f)).st_ino] = Path(d, f).read_bytes()


PAGE = 512  # small, so that the model's short records span pages


def pages_kept(rng: random.Random, old: bytes, current: bytes) -> bytes:
    """What the page cache wrote back, page by page in any order: each page of the
    file as written, or as flushed (zeros past the flushed end), and a size of either
    or in between. Writeback started on a range (sync_file_range) and the flusher do
    not keep the order of the writes."""
    low, high = sorted((len(old), len(current)))
    size = rng.choice([len(old), len(current), rng.randint(low, high)])
    padded = old + bytes(max(0, size - len(old)))
    out = bytearray(padded[:size])
    for start in range(0, size, PAGE):
        if rng.random() < 0.5:
            piece = current[start : start + PAGE]
            out[start : start + len(piece)] = piece[: size - start]
    return bytes(out)


def next_entry(rng: random.Random, have: list[Entry]) -> Entry:
    term = (have[-1].term if have else 1) + (rng.random() < 0.1)
    index = len(have) + 1
    if rng.random() < 0.08:
        return noop(term, index)
    shard, hour = rng.choice([0, 1, 2, 7, 9]), HOUR + rng.randrange(3)
    part = sum(e.kind == KIND_SEAL and e.block[:2] == (shard, hour) for e in have)
    if rng.random() < 0.15:
        return seal(term, index, (shard, hour, part))
    return data(term, index, (shard, hour, part), rng.randbytes(rng.randint(0, 300)))


def abandon(log: ReplicaLog) -> None:
    """The process dies: no close()."""
    for fd in [*log._fds.values(), log._wal_fd]:
        os.close(fd)


@pytest.mark.parametrize("pages", [False, True], ids=["prefix", "pages"])
@pytest.mark.parametrize("seed", range(CASES))
def test_acknowledged_entries_survive_a_crash(
    seed: int, pages: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, root = random.Random(seed), tmp_path.resolve() / "r"
    # fsync in this thread (the model records per call), small cycles (many checkpoints)
    monkeypatch.setattr(ReplicaLog, "_fsync", lambda self, fds: [os.fsync(f) for f in fds])
    monkeypatch.setattr(replica_log, "WAL_BYTES_MAX", rng.choice([1500, 4000]))
    # Zeros written and space reserved ahead, small: the same paths, taken more often,
    # without megabytes a file (at full size a run of 600 cases held 45 GB of the disk
    # for a while, and 1,000 cases filled it).
    monkeypatch.setattr(replica_log, "WAL_ZERO_AHEAD", 4096)
    monkeypatch.setattr(replica_log, "PREALLOC_BYTES", 16384)
    monkeypatch.setattr(replica_log, "PREALLOC_TOTAL_BYTES", 65536)
    monkeypatch.setattr(replica_log, "PREALLOC_MIN_BYTES", 4096)
    monkeypatch.setattr(os, "urandom", rng.randbytes)  # cycle ids: a seed replays exactly
    disk = Disk(monkeypatch, rng, pages)
    acked: list[Entry] = []
    for generation in range(4):
        # candidate: the log if the operation in flight completes; low: what must stay
        disk.crash_at = disk.syncs + rng.randint(1, 60)
        candidate, low = acked, len(acked)
        log: ReplicaLog | None = None
        try:
            log = ReplicaLog(root)
            for _ in range(rng.randint(1, 25)):
                r = rng.random()
                if r < 0.08 and acked:
                    low = cut = rng.randint(0, len(acked))
                    log.truncate_after(cut)
                    acked = acked[:cut]
                elif r < 0.14:  # a restart without a crash: closed, or the process died
                    if r < 0.11:
                        log.close()
                    else:
                        abandon(log)
                    log = None
                    log = ReplicaLog(root)
                else:
                    batch: list[Entry] = []
                    for _ in range(rng.choice([1, 1, 3])):
                        batch.append(next_entry(rng, acked + batch))
                    candidate = acked + batch
                    log.append(batch)
                    acked = candidate
                candidate, low = acked, len(acked)
        except Crash:
            pass
        if log is not None:  # the process dies (its files close with it)
            abandon(log)
        disk.crash(root)
        disk.crash_at = None
        log = ReplicaLog(root)
        got = log.read(1, 1 << 40) if log.last_index else []
        assert len(got) >= low, (seed, generation, "lost acknowledged entries")
        assert got == candidate[: len(got)], (seed, generation, "entries changed")
        abandon(log)
        acked = got
