"""A replica's log keeps per-entry records in memory only for entries not yet
published: released ones are read from their block files, and memory does not grow
with the log."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowray.core.invariant import InvariantError
from flowray.storage import replica_log
from flowray.storage.replica_log import BlockKey, ReplicaLog
from flowray.storage.segment import KIND_DATA, KIND_SEAL, Entry, read_payloads
from tests.test_replica_log import CONTROL, HOUR, check_against, data, noop, seal

A: BlockKey = (0, HOUR, 0)
B: BlockKey = (1, HOUR, 0)
C: BlockKey = (0, HOUR + 1, 0)
D: BlockKey = (1, HOUR + 1, 0)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[ReplicaLog]:
    replica = ReplicaLog(tmp_path / "r")
    yield replica
    replica.close()


def two_hours() -> list[Entry]:
    """Hour HOUR in blocks A and B, sealed at 8 and 9; hour HOUR + 1 (C, D) begun
    at 6, before those seals, and still open."""
    return [
        noop(1, 1),
        data(1, 2, A),
        data(1, 3, B),
        data(1, 4, A),
        data(1, 5, B),
        data(2, 6, C),
        data(2, 7, A),
        seal(2, 8, A),
        seal(2, 9, B),
        data(3, 10, D),
        data(3, 11, C),
    ]


def test_release_stops_at_the_first_entry_of_an_unpublished_block(log: ReplicaLog) -> None:
    entries = two_hours()
    log.append(entries)
    # Nothing published: only the control block's no-op.
    assert log.release(published_seal_index=0, commit_index=11) == 1
    assert log.release(published_seal_index=8, commit_index=11) == 2  # B begins at 3
    assert log.release(published_seal_index=9, commit_index=11) == 5  # C begins at 6
    assert log.release(published_seal_index=9, commit_index=4) == 5  # never goes back
    # Everything still reads as before: released entries from the block files.
    check_against(log, entries)
    assert [log.term_at(i) for i in range(12)] == [0] + [1] * 5 + [2] * 4 + [3] * 2
    for key in (A, B, C, D):
        payloads = [e.payload for e in entries if e.block == key and e.kind == KIND_DATA]
        assert log.block_payloads(key, 11) == payloads
        assert log.block_payloads(key, 4) == [
            e.payload for e in entries if e.block == key and e.kind == KIND_DATA and e.index <= 4
        ]
        path, slices = log.block_slices(key, 11, 2)
        assert [read_payloads(Path(path), s) for s in slices] == [payloads[::2], payloads[1::2]]
        assert Path(path).exists()


def test_release_is_bounded_by_the_commit_index(log: ReplicaLog) -> None:
    log.append([noop(1, 1), data(1, 2, A), seal(1, 3, A), data(1, 4, B)])
    # A's seal (3) is not committed yet: A is not published as far as this log knows.
    assert log.release(published_seal_index=3, commit_index=2) == 1
    assert log.release(published_seal_index=3, commit_index=3) == 3


def test_no_cut_into_released_entries(log: ReplicaLog) -> None:
    entries = two_hours()
    log.append(entries)
    log.release(published_seal_index=9, commit_index=11)
    with pytest.raises(InvariantError):
        log.truncate_after(4)  # released entries
    with pytest.raises(InvariantError):
        log.truncate_after(6)  # 7 and 8 belong to A, which is published
    check_against(log, entries)  # a refused cut changes nothing
    log.truncate_after(9)  # the core only ever cuts an uncommitted tail, as this
    check_against(log, entries[:9])


def test_reading_released_entries_in_small_windows(
    log: ReplicaLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up from far behind reads window after window of released entries, with
    block files scanned once and kept, evicted beyond the cache's size."""
    monkeypatch.setattr(replica_log, "COLD_WINDOW", 3)
    monkeypatch.setattr(replica_log, "COLD_CACHE_ENTRIES", 4)
    blocks = [(s, HOUR, 0) for s in range(4)]
    entries: list[Entry] = [noop(1, 1)]
    for i in range(2, 42):
        entries.append(data(1, i, blocks[i % 4], b"x" * (i % 5)))
    for key in blocks:
        entries.append(seal(1, len(entries) + 1, key))
    entries.append(data(1, len(entries) + 1, (0, HOUR + 1, 0)))
    log.append(entries)
    released = log.release(published_seal_index=len(entries) - 1, commit_index=len(entries))
    assert released == len(entries) - 1
    for start in (1, 2, 7, released, released + 1):
        assert log.read(start, 1 << 30) == entries[start - 1 :]
    got, index = [], 1
    while index <= len(entries):  # as a follower's catch-up does: a few bytes a call
        batch = log.read(index, 4)
        got += batch
        index = batch[-1].index + 1
    assert got == entries


def test_a_reopened_log_reads_everything_again(tmp_path: Path) -> None:
    entries = two_hours()
    first = ReplicaLog(tmp_path / "r")
    first.append(entries)
    first.release(published_seal_index=9, commit_index=11)
    first.close()
    again = ReplicaLog(tmp_path / "r")
    try:
        assert again.released_index == 0
        check_against(again, entries)
        again.append([data(3, 12, C)])
        check_against(again, [*entries, data(3, 12, C)])
    finally:
        again.close()


def test_memory_does_not_grow_with_released_entries(tmp_path: Path) -> None:
    """Hour after hour of small entries, each hour published: what the log holds in
    memory stays the same, instead of growing by hundreds of bytes an entry."""
    log = ReplicaLog(tmp_path / "r")
    try:
        index, held = 0, []
        log.append([noop(1, 1)])
        index = 1
        tracemalloc.start()
        for hour in range(HOUR, HOUR + 6):
            keys = [(s, hour, 0) for s in range(4)]
            for _ in range(50):
                batch = [data(1, index + 1 + i, keys[i % 4], b"p") for i in range(100)]
                log.append(batch)
                index += 100
            seals = [seal(1, index + 1 + i, k) for i, k in enumerate(keys)]
            log.append(seals)
            index += 4
            log.release(published_seal_index=index, commit_index=index)
            held.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        # 5,004 entries an hour: at the old 325 bytes an entry, 1.6 MB more each hour.
        assert held[-1] - held[1] < 200_000, held
        assert log.released_index == index
        assert len(log.read(index - 3, 1 << 20)) == 4
    finally:
        log.close()


# Found in review: each of these once ended in an InvariantError (a replica crash).


def test_an_uncommitted_no_op_after_a_release_can_be_cut(log: ReplicaLog) -> None:
    log.append([noop(1, 1), data(1, 2, A)])
    assert log.release(published_seal_index=0, commit_index=2) == 1
    log.append([noop(2, 3)])  # a new master's no-op that never commits
    log.truncate_after(2)
    assert log.blocks[CONTROL].last_index == 1 and log.blocks[CONTROL].entries == 1
    log.append([noop(3, 3)])
    check_against(log, [noop(1, 1), data(1, 2, A), noop(3, 3)])


def test_an_uncommitted_seal_does_not_release_its_block(log: ReplicaLog) -> None:
    entries = [noop(1, 1), data(1, 2, A), data(1, 3, B), seal(1, 4, B), data(2, 5, A)]
    log.append([*entries, seal(2, 6, A)])
    log.release(published_seal_index=7, commit_index=4)  # A's seal is not committed
    log.truncate_after(5)  # a divergent tail: A's seal goes
    check_against(log, entries)
    assert not log.blocks[A].sealed


def _walk(seed: int, tmp: Path, steps: int) -> tuple[int, int]:
    """A random life of a log against a model: appends over rolling hours with seals
    and new terms, commits, releases, cuts of the uncommitted tail, restarts. Returns
    how many cuts it made and the highest released index (so the test can check that
    it did both)."""
    rng = random.Random(seed)
    log = ReplicaLog(tmp)
    entries: list[Entry] = []
    term, commit, published, hour, cuts = 1, 0, 0, HOUR, 0
    sealed: set[BlockKey] = set()
    released: set[BlockKey] = set()
    base = most = 0
    try:
        for _ in range(steps):
            op = rng.random()
            if op < 0.45:  # a proposal: a few pieces, sometimes a seal or a no-op
                batch: list[Entry] = []
                if rng.random() < 0.1:
                    term += 1
                    batch.append(noop(term, len(entries) + 1))
                for _ in range(rng.randint(1, 6)):
                    key = (rng.randrange(3), hour + rng.randrange(2), 0)
                    index = len(entries) + len(batch) + 1
                    if key in sealed:
                        continue
                    if rng.random() < 0.15:
                        batch.append(seal(term, index, key))
                        sealed.add(key)
                    else:
                        batch.append(data(term, index, key, bytes(rng.randrange(9))))
                if batch:
                    log.append(batch)
                    entries += batch
                if rng.random() < 0.2:  # the hour is over: its blocks get sealed
                    hour += 1
                    due = sorted({e.block for e in entries if e.block[1] < hour} - sealed)
                    due = [key for key in due if key != CONTROL]
                    closing = [seal(term, len(entries) + 1 + i, key) for i, key in enumerate(due)]
                    if closing:
                        log.append(closing)
                        entries += closing
                        sealed.update(due)
            elif op < 0.6:
                commit = rng.randint(commit, len(entries))
            elif op < 0.75:  # the processor published every block sealed up to here
                # (by the master's commit index, which may be ahead of this replica's)
                ahead = commit if rng.random() < 0.7 else len(entries)
                seals = [e.index for e in entries if e.kind == KIND_SEAL and e.index <= ahead]
                published = max([published, *seals])
                for e in entries:
                    if e.kind == KIND_SEAL and e.index <= min(published, commit):
                        released.add(e.block)
                held = [
                    min(e.index for e in entries if e.block == key) - 1
                    for key in {e.block for e in entries}
                    if key not in released and key != CONTROL
                ]
                base = max(base, min([commit, len(entries), *held]))
                assert log.release(published, commit) == base == log.released_index
                most = max(most, base)
            elif op < 0.9 and len(entries) > commit:  # a divergent uncommitted tail
                after = rng.randint(commit, len(entries) - 1)
                log.truncate_after(after)
                for e in entries[after:]:
                    if e.kind == KIND_SEAL:
                        sealed.discard(e.block)
                del entries[after:]
                term = max(term, entries[-1].term if entries else 1)
                cuts += 1
            elif op > 0.95:  # a restart: the log reads everything from its files again
                log.close()
                log = ReplicaLog(tmp)
                base, released = 0, set()
            check_against(log, entries)
            for key in {e.block for e in entries}:
                want = [e.payload for e in entries if e.block == key and e.kind == KIND_DATA]
                assert log.block_payloads(key, len(entries)) == want
    finally:
        log.close()
    return cuts, most


@pytest.mark.parametrize("seed", range(12))
def test_a_random_life_matches_the_model(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_log, "COLD_WINDOW", 1 + seed % 5)
    monkeypatch.setattr(replica_log, "COLD_CACHE_ENTRIES", 2 + seed * 3 if seed % 2 else 10**6)
    monkeypatch.setattr(replica_log, "WAL_BYTES_MAX", 4096)  # checkpoints too
    cuts, released = _walk(seed, tmp_path / "r", steps=150)
    assert cuts > 0 and released > 0
