"""Tests for flowray.storage.replica_log: one replica's log spread over block files."""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.core.invariant import InvariantError
from flowray.storage import durable, replica_log
from flowray.storage.replica_log import WAL_NAME, BlockKey, ReplicaLog, block_path, hour_label
from flowray.storage.segment import (
    CONTROL_SHARD,
    HEADER_BYTES,
    KIND_DATA,
    KIND_NOOP,
    KIND_SEAL,
    CorruptSegment,
    Entry,
    RecordRef,
    encode,
    read_payloads,
    scan,
)

HOUR = 438_000  # 2019-12-20T00
A: BlockKey = (0, HOUR, 0)
B: BlockKey = (5, HOUR, 0)
C: BlockKey = (0, HOUR + 1, 0)
CONTROL: BlockKey = (CONTROL_SHARD, 0, 0)


def data(term: int, index: int, key: BlockKey, payload: bytes | None = None) -> Entry:
    shard, hour, part = key
    body = payload if payload is not None else f"e{index}".encode() * index
    return Entry(term, index, KIND_DATA, shard, hour, part, body)


def seal(term: int, index: int, key: BlockKey) -> Entry:
    shard, hour, part = key
    return Entry(term, index, KIND_SEAL, shard, hour, part)


def noop(term: int, index: int) -> Entry:
    return Entry(term, index, KIND_NOOP, *CONTROL)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[ReplicaLog]:
    replica = ReplicaLog(tmp_path / "r")
    yield replica
    replica.close()


def state(replica: ReplicaLog) -> tuple[object, ...]:
    """Everything observable about a log, for comparing two instances."""
    return (
        replica.last_index,
        replica.last_term,
        [replica.term_at(i) for i in range(replica.last_index + 1)],
        dict(replica.blocks),
        replica.read(1, 1 << 30) if replica.last_index else [],
    )


def check_against(replica: ReplicaLog, entries: list[Entry]) -> None:
    """The log holds exactly ``entries``, in memory and in its files."""
    assert replica.last_index == len(entries)
    assert replica.last_term == (entries[-1].term if entries else 0)
    if entries:
        assert replica.read(1, 1 << 30) == entries
    keys = {e.block for e in entries}
    assert set(replica.blocks) == keys
    for key in keys:
        mine = [e for e in entries if e.block == key]
        info = replica.blocks[key]
        assert info.entries == len(mine)
        assert info.bytes == sum(HEADER_BYTES + len(e.payload) for e in mine)
        assert info.first_index == mine[0].index
        assert info.last_index == mine[-1].index
        seals = [e.index for e in mine if e.kind == KIND_SEAL]
        assert info.seal_index == (seals[0] if seals else 0)
        assert info.sealed == bool(seals)
        path = block_path(replica.root, key)
        assert path.stat().st_size == info.bytes
        assert [r.index for r in scan(path.read_bytes())[0]] == [e.index for e in mine]
        # The slices map tasks read: every data payload once, slice k holding k, k+n...
        payloads = [e.payload for e in mine if e.kind == KIND_DATA]
        upto = mine[-1].index
        assert replica.block_payloads(key, upto) == payloads
        for n in (1, 3):
            where, spans = replica.block_slices(key, upto, n)
            assert where == str(path) and len(spans) == n
            assert [read_payloads(path, s) for s in spans] == [payloads[k::n] for k in range(n)]
    # An empty file (created, then nothing reached it before a crash) holds no entry.
    files = sorted(p for p in (replica.root / "blocks").glob("s*/*.seg") if p.stat().st_size)
    assert files == sorted(block_path(replica.root, k) for k in keys)


# --------------------------------------------------------------------------- basics


def test_empty_log(log: ReplicaLog) -> None:
    assert log.last_index == 0
    assert log.last_term == 0
    assert log.term_at(0) == 0
    assert log.blocks == {}
    assert log.read(1, 100) == []
    assert log.block_payloads(A, 10) == []
    with pytest.raises(InvariantError):
        log.term_at(1)


def test_block_path_names_shard_and_hour(tmp_path: Path) -> None:
    assert hour_label(HOUR) == "2019-12-20T00"
    assert block_path(tmp_path, (5, HOUR, 3)) == (
        tmp_path / "blocks" / "s0005" / "2019-12-20T00.h438000.p0003.seg"
    )


def interleaved() -> list[Entry]:
    return [
        noop(1, 1),
        data(1, 2, A),
        data(1, 3, B),
        data(1, 4, A),
        data(2, 5, C),
        data(2, 6, B),
        seal(2, 7, A),
        data(2, 8, C),
        data(3, 9, B),
    ]


def test_append_interleaved_blocks(log: ReplicaLog) -> None:
    entries = interleaved()
    written = log.append(entries[:4])
    written += log.append(entries[4:])
    assert written == sum(HEADER_BYTES + len(e.payload) for e in entries)
    check_against(log, entries)
    assert [log.term_at(i) for i in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert log.blocks[A].sealed and log.blocks[A].seal_index == 7
    assert not log.blocks[B].sealed
    assert log.blocks[CONTROL].entries == 1


def test_append_with_a_gap_raises_and_writes_nothing(log: ReplicaLog) -> None:
    log.append([data(1, 1, A)])
    size = block_path(log.root, A).stat().st_size
    for index in (1, 3, 0):
        with pytest.raises(InvariantError):
            log.append([data(1, index, A)])
    assert log.last_index == 1
    assert block_path(log.root, A).stat().st_size == size


def test_append_to_a_fresh_log_must_start_at_1(log: ReplicaLog) -> None:
    with pytest.raises(InvariantError):
        log.append([data(1, 2, A)])
    assert log.last_index == 0
    assert not block_path(log.root, A).exists()


def test_append_to_a_sealed_block_is_refused_before_writing(log: ReplicaLog) -> None:
    log.append([data(1, 1, A), seal(1, 2, A)])
    size = block_path(log.root, A).stat().st_size
    with pytest.raises(InvariantError):
        log.append([data(1, 3, A)])
    assert log.last_index == 2
    assert block_path(log.root, A).stat().st_size == size
    ReplicaLog(log.root).close()


def test_append_with_a_lower_term_is_refused_before_writing(log: ReplicaLog) -> None:
    log.append([data(2, 1, A)])
    size = block_path(log.root, A).stat().st_size
    with pytest.raises(InvariantError):
        log.append([data(1, 2, A)])
    assert log.last_index == 1
    assert block_path(log.root, A).stat().st_size == size
    ReplicaLog(log.root).close()


def test_a_sealed_part_is_followed_by_the_next_part(log: ReplicaLog) -> None:
    next_part: BlockKey = (A[0], A[1], 1)
    entries = [data(1, 1, A), seal(1, 2, A), data(1, 3, next_part), data(1, 4, next_part)]
    log.append(entries)
    check_against(log, entries)
    assert log.block_payloads(next_part, 4) == [entries[2].payload, entries[3].payload]


# --------------------------------------------------------------------------- reads


def test_read_respects_bytes_max_but_returns_at_least_one(log: ReplicaLog) -> None:
    entries = [data(1, i, A if i % 2 else B, b"x" * 10) for i in range(1, 11)]
    log.append(entries)
    assert log.read(1, 0) == entries[:1]
    assert log.read(1, 1) == entries[:1]
    assert log.read(1, 10) == entries[:1]
    assert log.read(1, 11) == entries[:2]
    assert log.read(3, 30) == entries[2:5]
    assert log.read(10, 1000) == entries[9:]
    assert log.read(11, 1000) == []
    assert log.read(1, 1 << 20) == entries


def test_block_payloads_only_data_up_to_the_commit(log: ReplicaLog) -> None:
    entries = interleaved()
    log.append(entries)
    assert log.block_payloads(A, 9) == [entries[1].payload, entries[3].payload]
    assert log.block_payloads(A, 3) == [entries[1].payload]
    assert log.block_payloads(A, 1) == []
    assert log.block_payloads(B, 6) == [entries[2].payload, entries[5].payload]
    assert log.block_payloads(CONTROL, 9) == []
    assert log.block_payloads((9, HOUR, 0), 9) == []


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("after", [0, 1, 3, 4, 6, 8, 9])
def test_truncate_after_cuts_files_and_survives_reopen(tmp_path: Path, after: int) -> None:
    entries = interleaved()
    log = ReplicaLog(tmp_path)
    log.append(entries)
    log.truncate_after(after)
    check_against(log, entries[:after])
    for gone in {e.block for e in entries[after:]} - {e.block for e in entries[:after]}:
        assert not block_path(tmp_path, gone).exists()
    before = state(log)
    log.close()
    again = ReplicaLog(tmp_path)
    assert state(again) == before
    check_against(again, entries[:after])
    # The log goes on from the cut with a newer term, as after a new master's overwrite.
    more = [data(4, after + 1, B, b"new"), data(4, after + 2, C, b"newer")]
    again.append(more)
    check_against(again, entries[:after] + more)
    again.close()
    third = ReplicaLog(tmp_path)
    check_against(third, entries[:after] + more)
    third.close()


def test_truncate_after_unseals_a_block(log: ReplicaLog) -> None:
    entries = interleaved()
    log.append(entries)
    log.truncate_after(6)
    assert not log.blocks[A].sealed
    log.append([data(3, 7, A, b"late")])
    check_against(log, [*entries[:6], data(3, 7, A, b"late")])


def test_truncate_after_the_last_index_changes_nothing(log: ReplicaLog) -> None:
    log.append(interleaved())
    before = state(log)
    log.truncate_after(9)
    assert state(log) == before


@pytest.mark.parametrize("after", [-1, 10])
def test_truncate_after_out_of_range(log: ReplicaLog, after: int) -> None:
    log.append(interleaved())
    with pytest.raises(InvariantError):
        log.truncate_after(after)


# --------------------------------------------------------------------------- recovery


def test_reopen_gives_the_same_state(tmp_path: Path) -> None:
    log = ReplicaLog(tmp_path)
    log.append(interleaved())
    before = state(log)
    log.close()
    again = ReplicaLog(tmp_path)
    assert state(again) == before
    assert again.block_payloads(A, 9) == log.block_payloads(A, 9)
    again.close()


def cut_last_record(path: Path) -> None:
    refs, _ = scan(path.read_bytes())
    with open(path, "r+b") as fh:
        fh.truncate(refs[-1].offset)


def lose_wal_from(root: Path, index: int) -> None:
    """The write-ahead file loses the batch holding entry ``index`` and those after:
    a crash before that append had its fsync (so it was never acknowledged). A batch
    is all or nothing: its check covers every record in it."""
    path = root / WAL_NAME
    batches = replica_log.wal_batches(path.read_bytes())
    cut = next((at for at, refs in batches if any(r.index >= index for r in refs)), None)
    if cut is not None:
        with open(path, "r+b") as fh:
            fh.truncate(cut)


def wal_records(root: Path) -> list[RecordRef]:
    batches = replica_log.wal_batches((root / WAL_NAME).read_bytes())
    return [ref for _offset, refs in batches for ref in refs]


def test_the_write_ahead_file_restores_what_block_files_lost(tmp_path: Path) -> None:
    """Block files are fsynced only at checkpoints: records the page cache had not
    written when the machine stopped come back from the write-ahead file."""
    entries = interleaved()
    log = ReplicaLog(tmp_path)
    log.append(entries[:5])
    log.append(entries[5:])
    log.close()
    for key in (A, B):
        cut_last_record(block_path(tmp_path, key))
    block_path(tmp_path, C).unlink()
    again = ReplicaLog(tmp_path)
    check_against(again, entries)
    assert wal_records(tmp_path) == [], "replayed, then started over"
    again.close()
    third = ReplicaLog(tmp_path)  # and it stays so with the write-ahead file empty
    check_against(third, entries)
    third.close()


def test_a_checkpoint_empties_the_write_ahead_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_log, "WAL_BYTES_MAX", 200)
    entries = [data(1, i, (A, B, C)[i % 3], b"x" * 60) for i in range(1, 31)]
    log = ReplicaLog(tmp_path)
    for entry in entries:
        log.append([entry])
        held = wal_records(tmp_path)
        assert sum(HEADER_BYTES + r.length for r in held) <= 200 + 60 + HEADER_BYTES
    log.close()
    check_against(ReplicaLog(tmp_path), entries)


def test_a_cut_tail_does_not_come_back_from_the_write_ahead_file(tmp_path: Path) -> None:
    entries = interleaved()
    log = ReplicaLog(tmp_path)
    log.append(entries)
    log.truncate_after(4)
    log.close()
    again = ReplicaLog(tmp_path)
    check_against(again, entries[:4])
    again.close()


def test_a_new_cycle_writes_over_the_old_one_and_only_it_comes_back(tmp_path: Path) -> None:
    """A checkpoint starts a cycle at the file's start without emptying the file: the
    earlier cycle's batches stay past the new one's end, with entries whose indexes
    continue the new log (a cut tail). Recovery must take the new cycle alone."""
    old = [data(1, i, (A, B)[i % 2], b"old" * 20) for i in range(1, 13)]
    log = ReplicaLog(tmp_path)
    for entry in old:
        log.append([entry])
    size = (tmp_path / WAL_NAME).stat().st_size
    log.truncate_after(6)  # a checkpoint: a new cycle
    new = [data(3, 7, C, b"new")]
    log.append(new)
    log.close()
    raw = (tmp_path / WAL_NAME).read_bytes()
    assert len(raw) == size, "the file was written over, not emptied"
    assert encode(old[-1]) in raw, "the earlier cycle's batches are still there"
    assert [r.index for r in wal_records(tmp_path)] == [7]
    block_path(tmp_path, C).unlink()  # 7 never reached its block file: the WAL has it
    again = ReplicaLog(tmp_path)
    check_against(again, old[:6] + new)
    again.close()


def test_a_torn_batch_ends_the_cycle(tmp_path: Path) -> None:
    entries = interleaved()
    log = ReplicaLog(tmp_path)
    log.append(entries[:3])
    log.append(entries[3:6])
    log.close()
    path = tmp_path / WAL_NAME
    (start, _), (_first, _), (torn, refs) = replica_log.wal_batches(path.read_bytes())
    assert start == 0 and [r.index for r in refs] == [4, 5, 6]
    raw = bytearray(path.read_bytes())
    assert refs[0].offset == torn + replica_log.WAL_BATCH.size  # offsets in the file
    raw[refs[1].offset + HEADER_BYTES] ^= 0xFF
    path.write_bytes(bytes(raw))
    for key in (A, B, C):
        block_path(tmp_path, key).unlink(missing_ok=True)  # the page cache lost them all
    again = ReplicaLog(tmp_path)
    check_against(again, entries[:3])
    again.close()


def test_a_batch_header_over_other_intact_records_is_refused() -> None:
    """A header is checked against its records' own checksums: a header that survived
    over intact records of another batch (same lengths) does not take them."""
    one, two, other = data(1, 1, A), data(1, 2, A, b"x" * 10), data(1, 2, A, b"y" * 10)
    wal = replica_log.wal_batch(7, [encode(one)]) + replica_log.wal_batch(7, [encode(two)])
    assert [[r.index for r in refs] for _, refs in replica_log.wal_batches(wal)] == [[1], [2]]
    forged = wal.replace(encode(two), encode(other))
    assert [[r.index for r in refs] for _, refs in replica_log.wal_batches(forged)] == [[1]]
    other_cycle = replica_log.wal_batch(7, [encode(one)]) + replica_log.wal_batch(8, [encode(two)])
    assert len(replica_log.wal_batches(other_cycle)) == 1


def test_recovery_keeps_the_gap_free_prefix(tmp_path: Path) -> None:
    """Entry 8 reached its file, entry 7 did not reach its own: 8 and 9 must go."""
    entries = [
        data(1, 1, A),
        data(1, 2, B),
        data(1, 3, A),
        data(1, 4, C),
        data(1, 5, B),
        data(1, 6, A),
        data(1, 7, C),
        data(1, 8, B),
        data(1, 9, A),
    ]
    log = ReplicaLog(tmp_path)
    log.append(entries)
    log.close()
    lose_wal_from(tmp_path, 7)
    cut_last_record(block_path(tmp_path, C))  # entry 7 lost
    again = ReplicaLog(tmp_path)
    check_against(again, entries[:6])
    # Entries 8 (in B) and 9 (in A) were cut from their files, not just ignored.
    assert block_path(tmp_path, B).stat().st_size == again.blocks[B].bytes
    assert block_path(tmp_path, A).stat().st_size == again.blocks[A].bytes
    more = [data(2, 7, B, b"after")]
    again.append(more)
    again.close()
    third = ReplicaLog(tmp_path)
    check_against(third, entries[:6] + more)
    third.close()


def test_recovery_removes_a_file_holding_only_entries_past_a_gap(tmp_path: Path) -> None:
    entries = [data(1, 1, A), data(1, 2, B), data(1, 3, C)]
    log = ReplicaLog(tmp_path)
    log.append(entries)
    log.close()
    lose_wal_from(tmp_path, 2)
    block_path(tmp_path, B).write_bytes(b"")  # entry 2 never reached the disk
    again = ReplicaLog(tmp_path)
    check_against(again, entries[:1])
    assert not block_path(tmp_path, C).exists()
    again.close()


def test_recovery_cuts_a_torn_tail_in_one_file(tmp_path: Path) -> None:
    entries = interleaved()
    log = ReplicaLog(tmp_path)
    log.append(entries)
    log.close()
    lose_wal_from(tmp_path, 9)
    path = block_path(tmp_path, B)  # holds entries 3, 6 and 9
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    again = ReplicaLog(tmp_path)
    check_against(again, entries[:8])
    again.close()


def test_a_lost_page_before_one_that_landed_is_rewritten_from_the_write_ahead_file(
    tmp_path: Path,
) -> None:
    """The page cache writes a file's pages back in any order: after a power cut, the
    page of entry 3 may be zeros while entry 9's page, after it, landed. That is not
    corruption: both were written after the checkpoint, so the write-ahead file holds
    them, and recovery cuts the file at the hole and copies them back."""
    entries = interleaved()
    log = ReplicaLog(tmp_path)
    for entry in entries:
        log.append([entry])
    log.close()
    path = block_path(tmp_path, B)  # entries 3, 6 and 9
    raw = bytearray(path.read_bytes())
    first = scan(bytes(raw))[0][0]
    raw[first.offset : first.offset + HEADER_BYTES + first.length] = bytes(
        HEADER_BYTES + first.length
    )
    path.write_bytes(bytes(raw))
    again = ReplicaLog(tmp_path)
    check_against(again, entries)
    assert path.stat().st_size == again.blocks[B].bytes, "the hole was cut, not kept"
    again.close()


def test_a_block_file_is_written_only_after_its_batch_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the write-ahead flush fails (the machine stops in it), no block file holds
    the batch: a block file's unflushed bytes are always named by a flushed batch."""
    log = ReplicaLog(tmp_path)
    log.append([data(1, 1, A), data(1, 2, B)])
    sizes = {key: block_path(tmp_path, key).stat().st_size for key in (A, B)}

    def power_cut(fd: int) -> None:
        raise OSError(errno.EIO, "the machine stopped")

    monkeypatch.setattr(os, "fdatasync", power_cut)
    with pytest.raises(OSError):
        log.append([data(1, 3, A), data(1, 4, B), data(1, 5, C)])
    assert {key: block_path(tmp_path, key).stat().st_size for key in (A, B)} == sizes
    assert block_path(tmp_path, C).stat().st_size == 0
    monkeypatch.undo()
    log.close()


@pytest.mark.parametrize(
    ("damaged", "refusal"),
    [
        (0, "a bad record at byte 0 before flushed entry 6"),  # entry 3: 6 intact after it
        (1, "entry 6 is missing or damaged, though entries up to 6 were flushed"),
    ],
)
def test_a_damaged_flushed_entry_is_refused_on_every_open(
    tmp_path: Path, damaged: int, refusal: str
) -> None:
    """Entries before the write-ahead cycle's first were flushed at its checkpoint: one
    of them damaged is corruption, and cutting the log there would drop acknowledged
    entries (that a majority may count on), so the log refuses to open, and again on
    the next try: the write-ahead file that proves it is kept."""
    entries = interleaved()
    log = ReplicaLog(tmp_path)
    log.append(entries[:6])
    log._checkpoint()  # entries 1-6 flushed to their block files
    log.append(entries[6:])
    log.close()
    path = block_path(tmp_path, B)  # entries 3 and 6 flushed, 9 in the write-ahead file
    raw = bytearray(path.read_bytes())
    record = scan(bytes(raw))[0][damaged]
    raw[record.offset + HEADER_BYTES] ^= 0xFF  # its payload's first byte
    path.write_bytes(bytes(raw))
    for _attempt in range(3):
        with pytest.raises(CorruptSegment, match=refusal):
            ReplicaLog(tmp_path)
    assert [r.index for r in wal_records(tmp_path)] == [7, 8, 9], "the proof is kept"
    if damaged == 0:
        assert path.read_bytes() == bytes(raw), "refused untouched"


# --------------------------------------------------------------------------- property


def random_log(rng: random.Random, n: int) -> list[Entry]:
    """A plausible log: growing terms, data in a few blocks, seals, control no-ops."""
    hours = [(0, HOUR), (3, HOUR), (3, HOUR + 1)]
    part = dict.fromkeys(hours, 0)
    term = 1
    out: list[Entry] = []
    for index in range(1, n + 1):
        if rng.random() < 0.15:
            term += 1
        roll = rng.random()
        if roll < 0.1:
            out.append(noop(term, index))
            continue
        shard, hour = rng.choice(hours)
        key = (shard, hour, part[(shard, hour)])
        if roll < 0.25:
            out.append(seal(term, index, key))
            part[(shard, hour)] += 1
        else:
            out.append(data(term, index, key, rng.randbytes(rng.randint(0, 50))))
    return out


@given(seed=st.integers(0, 2**32), n=st.integers(1, 30), data_=st.data())
@settings(max_examples=30, deadline=None)
def test_random_appends_truncates_and_reopens(seed: int, n: int, data_: st.DataObject) -> None:
    rng = random.Random(seed)
    entries = random_log(rng, n)
    after = data_.draw(st.integers(0, n))
    split = data_.draw(st.integers(0, n))
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        log = ReplicaLog(root)
        log.append(entries[:split])
        log.append(entries[split:])
        check_against(log, entries)
        log.truncate_after(after)
        check_against(log, entries[:after])
        log.close()
        again = ReplicaLog(root)
        check_against(again, entries[:after])
        for key in again.blocks:
            assert again.block_payloads(key, after) == [
                e.payload for e in entries[:after] if e.block == key and e.kind == KIND_DATA
            ]
        again.close()


def test_block_files_are_sent_to_the_disk_in_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block file's new bytes are handed to the disk (start_writeback) once there are
    WRITEBACK_BYTES of them, and all of them when it is sealed; a cut file starts
    again from its new end; nothing written is lost to it."""
    calls: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int) -> bool:
        calls.append((offset, length))
        return durable.start_writeback(fd, offset, length)

    monkeypatch.setattr(replica_log, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(replica_log, "start_writeback", record)
    log = ReplicaLog(tmp_path)
    entries = [data(1, i, A, b"x" * 300) for i in range(1, 9)]
    for entry in entries[:5]:
        log.append([entry])
    frame = len(encode(entries[0]))  # 336: the 3rd frame passes 1,000 bytes
    assert calls == [(0, 3 * frame)]
    log.truncate_after(2)  # a cut below what was handed over: start from the new end
    calls.clear()
    for entry in entries[2:8]:
        log.append([entry])
    assert calls == [(2 * frame, 3 * frame), (5 * frame, 3 * frame)]
    calls.clear()
    log.append([seal(1, 9, A)])  # sealed: whatever is left, however little
    assert calls == [(8 * frame, len(encode(seal(1, 9, A))))]
    log.close()
    check_against(ReplicaLog(tmp_path), [*entries, seal(1, 9, A)])


def test_many_open_files_are_written_back_in_smaller_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more open block files than a checkpoint cycle gives each 1 MiB, the step
    shrinks, so a checkpoint still finds the files mostly written."""
    lengths: list[int] = []
    monkeypatch.setattr(replica_log, "WAL_BYTES_MAX", 40_000)
    monkeypatch.setattr(replica_log, "start_writeback", lambda fd, o, n: lengths.append(n))
    log = ReplicaLog(tmp_path)
    keys = [(shard, HOUR, 0) for shard in range(10)]  # 10 files: a step of 2,000 bytes
    for index in range(1, 31):
        log.append([data(1, index, keys[index % 10], b"z" * 900)])
    log.close()
    assert lengths and all(2000 <= n < 4000 for n in lengths)


def test_start_writeback_on_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"y" * 10_000)
    fd = os.open(path, os.O_RDWR)
    try:
        assert durable.start_writeback(fd, 0, 10_000) is sys.platform.startswith("linux")
        assert durable.start_writeback(fd, 0, 0) is False
    finally:
        os.close(fd)
    assert durable.start_writeback(-1, 0, 10) is False  # not a descriptor: refused


def allocated(path: Path) -> int:
    """Bytes of disk a file holds (what preallocation reserves past its end counts)."""
    return path.stat().st_blocks * 512


def page_rounded(size: int) -> int:
    return -(-size // 4096) * 4096


@pytest.fixture
def reserving(tmp_path: Path) -> None:
    """Skip where the file system under the tests cannot reserve space past a file's end."""
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if durable.preallocate(fd, 0, 1 << 20) != 0:
            pytest.skip("fallocate(FALLOC_FL_KEEP_SIZE) is not available here")
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.usefixtures("reserving")
def test_block_files_reserve_space_ahead_and_give_it_back_when_sealed(tmp_path: Path) -> None:
    """A growing block file holds disk space past its end, which readers never see (its
    size is what was written); sealing it gives the space back."""
    log = ReplicaLog(tmp_path / "r")
    entries = [data(1, i, A, b"p" * 500) for i in range(1, 6)]
    log.append(entries)
    path = block_path(log.root, A)
    size = sum(len(encode(e)) for e in entries)
    assert path.stat().st_size == size
    assert allocated(path) >= size + replica_log.PREALLOC_BYTES // 2
    check_against(log, entries)
    log.append([seal(1, 6, A)])
    assert allocated(path) <= page_rounded(path.stat().st_size)
    log.close()
    check_against(ReplicaLog(tmp_path / "r"), [*entries, seal(1, 6, A)])


@pytest.mark.usefixtures("reserving")
def test_a_crash_with_space_reserved_and_a_torn_tail_recovers_and_gives_the_space_back(
    tmp_path: Path,
) -> None:
    """Killed with space reserved past a block file's end and half a record written into
    it: recovery cuts the half record, gives the space back, and appends go on."""
    root = tmp_path / "r"
    log = ReplicaLog(root)
    entries = [data(1, i, key, b"q" * 700) for i, key in enumerate([A, B, A, B, A], 1)]
    log.append(entries)
    path = block_path(root, A)
    with open(path, "ab") as fh:  # what a write cut short by the crash leaves
        fh.write(encode(data(1, 6, A, b"q" * 700))[:300])
    assert allocated(path) > page_rounded(path.stat().st_size)
    for fd in [*log._fds.values(), log._wal_fd]:  # no close(): the process died
        os.close(fd)
    again = ReplicaLog(root)
    check_against(again, entries)
    for key in (A, B):
        p = block_path(root, key)
        assert allocated(p) <= page_rounded(p.stat().st_size)
    more = [data(1, 6, A, b"r" * 700), data(1, 7, B), seal(1, 8, A)]
    again.append(more)
    again.close()
    check_against(ReplicaLog(root), [*entries, *more])


@pytest.mark.usefixtures("reserving")
def test_a_cut_into_a_file_with_space_reserved_keeps_the_log_exact(tmp_path: Path) -> None:
    """A divergent tail cut from a file that holds reserved space: the file ends at the
    cut, the space is given back, and later appends reserve again."""
    log = ReplicaLog(tmp_path / "r")
    entries = [data(1, i, A, b"s" * 400) for i in range(1, 7)]
    log.append(entries)
    log.truncate_after(3)
    path = block_path(log.root, A)
    assert allocated(path) <= page_rounded(path.stat().st_size)
    check_against(log, entries[:3])
    newer = [data(2, i, A, b"t" * 400) for i in range(4, 8)]
    log.append(newer)
    assert allocated(path) > page_rounded(path.stat().st_size)
    check_against(log, [*entries[:3], *newer])
    log.close()
    assert allocated(path) <= page_rounded(path.stat().st_size)
    check_against(ReplicaLog(tmp_path / "r"), [*entries[:3], *newer])


def test_reservations_shrink_with_many_open_files_and_stop_where_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With many open block files each reserves less (the total stays about
    PREALLOC_TOTAL_BYTES); a file system that refuses is not asked again, and the log
    works the same without."""
    asked: list[int] = []

    def record(fd: int, offset: int, length: int) -> int:
        asked.append(length)
        return 0

    monkeypatch.setattr(replica_log, "PREALLOC_TOTAL_BYTES", 1 << 20)
    monkeypatch.setattr(replica_log, "PREALLOC_MIN_BYTES", 1 << 10)
    monkeypatch.setattr(replica_log, "preallocate", record)
    log = ReplicaLog(tmp_path / "many")
    keys = [(shard, HOUR, 0) for shard in range(16)]  # 16 files: 64 KiB ahead each
    log.append([data(1, i, keys[i - 1], b"u" * 100) for i in range(1, 17)])
    assert len(asked) == 16 and max(asked) <= 64 * 1024 + 256
    asked.clear()
    log.append([data(1, 17, keys[0], b"u" * 100)])  # still well inside its reservation
    assert asked == []
    log.close()

    def refuse(code: int) -> object:
        return lambda fd, offset, length: asked.append(length) or code

    monkeypatch.setattr(replica_log, "preallocate", refuse(errno.EOPNOTSUPP))
    refused = ReplicaLog(tmp_path / "refused")
    entries = [data(1, i, keys[i % 3]) for i in range(1, 10)]
    for entry in entries:
        refused.append([entry])
    assert len(asked) == 1  # not supported: refused once, never asked again
    check_against(refused, entries)
    refused.close()

    asked.clear()  # refused for now (a full disk): each file asks again only later
    monkeypatch.setattr(replica_log, "preallocate", refuse(errno.ENOSPC))
    full = ReplicaLog(tmp_path / "full")
    for entry in entries:
        full.append([entry])
    assert len(asked) == 3  # once for each of the three files
    check_against(full, entries)
    full.close()


def test_trim_preallocation_leaves_a_plain_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"v" * 10_000)
    fd = os.open(path, os.O_RDWR)
    try:
        assert durable.trim_preallocation(fd) is False
        assert path.read_bytes() == b"v" * 10_000
    finally:
        os.close(fd)
    assert durable.preallocate(-1, 0, 10) == errno.EBADF  # not a descriptor: refused
    assert durable.trim_preallocation(-1) is False  # only a hint: never raises


def test_new_files_directories_are_flushed_at_the_checkpoint_not_on_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating a block file flushes no directory on the acknowledgement path; the
    next checkpoint flushes the new files' directories before its new cycle begins
    (after which the write-ahead file no longer holds their records)."""
    flushed: list[str] = []
    monkeypatch.setattr(replica_log, "fsync_path", lambda p: flushed.append(Path(p).name))
    monkeypatch.setattr(replica_log, "WAL_BYTES_MAX", 4000)
    log = ReplicaLog(tmp_path / "r")
    flushed.clear()  # what the constructor flushed (the new write-ahead file's directory)
    log.append([data(1, 1, A, b"a" * 100), data(1, 2, B, b"b" * 100)])
    assert flushed == []
    cycles = []
    real_start = log._start_wal

    def start_wal() -> None:
        cycles.append(sorted(flushed))
        real_start()

    monkeypatch.setattr(log, "_start_wal", start_wal)
    log.append([data(1, 3, A, b"c" * 4000)])  # past WAL_BYTES_MAX: a checkpoint
    assert cycles == [sorted(["blocks", "s0000", "s0005"])]  # then the new cycle
    flushed.clear()
    log.append([data(1, 4, A, b"d" * 100)])  # an old file: nothing to flush
    assert flushed == []
    log.close()


def test_a_new_shard_directory_lost_in_a_crash_comes_back(tmp_path: Path) -> None:
    """Killed before a checkpoint flushed the directory entries of new block files
    (here the whole new shard directory never reached the disk): recovery recreates
    them from the write-ahead file, and every acknowledged entry is there."""
    root = tmp_path / "r"
    log = ReplicaLog(root)
    first = [data(1, 1, A), data(1, 2, A)]
    log.append(first)
    log._checkpoint()  # A's directory is on disk
    more = [data(1, 3, B), data(1, 4, C), data(1, 5, B), seal(1, 6, B)]
    for entry in more:
        log.append([entry])
    for fd in [*log._fds.values(), log._wal_fd]:  # no close(): the process died
        os.close(fd)
    shutil.rmtree(block_path(root, B).parent)  # s0005: its entry was never flushed
    block_path(root, C).unlink()  # a new hour's file in an old directory, the same
    again = ReplicaLog(root)
    check_against(again, [*first, *more])
    again.close()


def test_a_cut_that_removes_a_file_flushes_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file holding only cut entries is removed, and its directory flushed: a crash
    must not bring it, and the cut tail, back."""
    log = ReplicaLog(tmp_path / "r")
    log.append([data(1, 1, A), data(1, 2, B)])
    log._checkpoint()  # the new files' directories: flushed here, not by the cut
    flushed: list[str] = []
    monkeypatch.setattr(replica_log, "fsync_path", lambda p: flushed.append(Path(p).name))
    log.truncate_after(1)
    assert not block_path(log.root, B).exists()
    assert sorted(flushed) == ["blocks", "s0005"]
    log.close()
    check_against(ReplicaLog(tmp_path / "r"), [data(1, 1, A)])


def test_checkpoints_come_at_sizes_spread_below_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each cycle checkpoints somewhere in the top quarter below WAL_BYTES_MAX, drawn
    afresh, so the replicas of a group (which write the same bytes) do not all
    checkpoint at the same append."""
    monkeypatch.setattr(replica_log, "WAL_BYTES_MAX", 8000)
    sizes: list[int] = []
    log = ReplicaLog(tmp_path / "r")
    real_checkpoint = log._checkpoint

    def checkpoint() -> None:
        sizes.append(log._wal_bytes)
        real_checkpoint()

    monkeypatch.setattr(log, "_checkpoint", checkpoint)
    entries = [data(1, i, (A, B)[i % 2], b"w" * 64) for i in range(1, 1201)]
    for entry in entries:
        log.append([entry])
    frame = len(replica_log.wal_batch(0, [encode(entries[0])]))
    assert len(sizes) >= 10
    assert all(6000 < size <= 8000 + frame for size in sizes)
    assert len(set(sizes)) > 1  # not one size for every cycle
    log.close()
    check_against(ReplicaLog(tmp_path / "r"), entries)


def test_a_new_log_flushes_the_directories_it_creates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica's directory, created with the log, has its entry flushed in its parent
    (and so on up to the first that existed): else a power cut could take the new
    replica's whole log, acknowledged entries and all."""
    flushed: list[Path] = []
    real = durable.fsync_path
    monkeypatch.setattr(durable, "fsync_path", lambda p: flushed.append(Path(p)) or real(p))
    root = tmp_path / "groups" / "g0" / "r1"
    ReplicaLog(root).close()
    made = [tmp_path / "groups", tmp_path / "groups" / "g0", root, root / "blocks"]
    assert [p.parent for p in made] == flushed[:4]
    flushed.clear()
    ReplicaLog(root).close()  # nothing new: nothing more than before
    assert tmp_path not in flushed and root.parent not in flushed
