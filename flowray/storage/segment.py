"""Framed, checksummed records in append-only segment files.

Each record is a fixed 36-byte header and a payload::

    magic u16 | version u8 | kind u8 | shard u16 | part u16 | hour u32 |
    length u32 | crc32 u32 | term u64 | index u64 | payload[length]

The CRC covers every header byte except itself, and the payload, so a flipped bit
anywhere is found. A bad record with no intact record after it — a partial record, or
zeros where the file grew but the data never landed — is a torn write: it was never
fsynced, so this replica never acknowledged it, and recovery cuts it (damage to the
very last record looks the same and is cut too; the replica then catches up from the
master). A bad record with an intact record after it is corruption, and reading it
raises instead of guessing.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowray.core.entry import (
    CONTROL_SHARD,
    KIND_DATA,
    KIND_NOOP,
    KIND_SEAL,
    KINDS,
    Entry,
)
from flowray.core.invariant import require

__all__ = ["CONTROL_SHARD", "KIND_DATA", "KIND_NOOP", "KIND_SEAL", "KINDS", "Entry"]

MAGIC = 0xF10E
VERSION = 1
HEADER = struct.Struct("<HBBHHIIIQQ")
HEADER_BYTES = HEADER.size
PAYLOAD_BYTES_MAX = 256 * 1024 * 1024
_CRC_AT = 16  # offset of the crc32 field; it is left out of its own checksum


class CorruptSegment(RuntimeError):
    """A record failed its checksum with good data after it: not a torn tail."""


def encode(entry: Entry) -> bytes:
    """Frame an entry; checks the entry before it reaches the disk."""
    require(entry.kind in KINDS, f"unknown entry kind {entry.kind}")
    require(entry.term >= 1 and entry.index >= 1, "term and index start at 1")
    require(len(entry.payload) <= PAYLOAD_BYTES_MAX, "payload over the record size limit")
    header = HEADER.pack(
        MAGIC,
        VERSION,
        entry.kind,
        entry.shard,
        entry.part,
        entry.hour,
        len(entry.payload),
        0,
        entry.term,
        entry.index,
    )
    crc = _crc(header, entry.payload)
    return header[:_CRC_AT] + struct.pack("<I", crc) + header[_CRC_AT + 4 :] + entry.payload


def _crc(header: bytes, payload: bytes) -> int:
    crc = zlib.crc32(header[:_CRC_AT])
    crc = zlib.crc32(header[_CRC_AT + 4 :], crc)
    return zlib.crc32(payload, crc)


@dataclass(frozen=True)
class RecordRef:
    """Where an entry sits in a segment, and what it is, without its payload."""

    offset: int
    length: int
    kind: int
    term: int
    index: int
    shard: int
    hour: int
    part: int


def _parse_header(buf: bytes) -> tuple[int, ...]:
    return HEADER.unpack(buf)


def scan(data: bytes) -> tuple[list[RecordRef], int]:
    """Parse a whole segment image; return its good records and the good length.

    Raises :class:`CorruptSegment` when a bad record is followed by more data, since
    that cannot be a torn write.
    """
    refs, pos = intact_prefix(data)
    if pos < len(data) and not _is_torn_tail(data, pos):
        raise CorruptSegment(f"bad record at byte {pos}: {_check_record(data, pos)}")
    return refs, pos


def intact_prefix(
    data: bytes, start: int = 0, end: int | None = None
) -> tuple[list[RecordRef], int]:
    """The records of ``data[start:end]`` up to the first that is not whole and intact
    within it, and where they end: no judgement on what follows (see :func:`scan`)."""
    end = len(data) if end is None else end
    refs: list[RecordRef] = []
    pos = start
    while pos < end and _check_record(data, pos) is None:
        ref = _ref_at(data, pos)
        if pos + HEADER_BYTES + ref.length > end:
            break
        refs.append(ref)
        pos += HEADER_BYTES + ref.length
    return refs, pos


def _ref_at(data: bytes, pos: int) -> RecordRef:
    """The record whose header is at ``pos`` (checked by the caller)."""
    _m, _v, kind, shard, part, hour, length, _c, term, index = _parse_header(
        data[pos : pos + HEADER_BYTES]
    )
    return RecordRef(pos, length, kind, term, index, shard, hour, part)


def record_crc(data: bytes, offset: int = 0) -> bytes:
    """The 4 bytes of the checksum field of the record at ``offset``."""
    return data[offset + _CRC_AT : offset + _CRC_AT + 4]


def _check_record(data: bytes, pos: int) -> str | None:
    """None when the record at ``pos`` is whole and intact, else why it is not."""
    if pos + HEADER_BYTES > len(data):
        return "truncated header"
    magic, version, kind, _s, _p, _h, length, crc, _t, _i = _parse_header(
        data[pos : pos + HEADER_BYTES]
    )
    if magic != MAGIC or version != VERSION or kind not in KINDS:
        return "bad magic, version or kind"
    end = pos + HEADER_BYTES + length
    if end > len(data):
        return "truncated payload"
    header = data[pos : pos + HEADER_BYTES]
    if _crc(header, data[pos + HEADER_BYTES : end]) != crc:
        return "checksum mismatch"
    return None


def intact_after(data: bytes, pos: int) -> Iterator[RecordRef]:
    """The intact records that begin after byte ``pos`` (a bad record's), wherever a
    record's magic starts one."""
    magic = struct.pack("<H", MAGIC)
    at = data.find(magic, pos + 1)
    while at != -1:
        if _check_record(data, at) is None:
            ref = _ref_at(data, at)
            yield ref
            at += HEADER_BYTES + ref.length
            continue
        at = data.find(magic, at + 1)


def _is_torn_tail(data: bytes, pos: int) -> bool:
    """A bad record is a torn write only if no intact record follows it.

    For a file of which nothing else is known, a crash is taken to damage only the
    end: a partial record, or zeros where the file grew but data never landed. Any
    intact record after the bad one then means the bad one was once whole, so it is
    corruption, whatever its damaged length field claims. (The page cache does write
    a file's pages back in any order; a replica's block files are repaired from its
    write-ahead file before this check, see replica_log._replay_wal.)
    """
    return next(intact_after(data, pos), None) is None


def recover(path: Path) -> list[RecordRef]:
    """Scan a segment on start-up, cut a torn tail, and return its records."""
    data = path.read_bytes()
    refs, good = scan(data)
    if good < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good)
            fh.flush()
            os.fsync(fh.fileno())
    return refs


def read_entries(path: Path, refs: list[RecordRef] | None = None) -> Iterator[Entry]:
    """Read and verify every record of a segment (or only ``refs``)."""
    data = path.read_bytes()
    if refs is None:
        refs, good = scan(data)
        require(good == len(data), f"{path} has a torn tail that recovery did not cut")
    return entries_in(data, refs, str(path))


def entries_in(data: bytes, refs: list[RecordRef], where: str = "segment") -> Iterator[Entry]:
    """The entries of ``refs`` in a segment image, each verified."""
    for ref in refs:
        problem = _check_record(data, ref.offset)
        if problem is not None:
            raise CorruptSegment(f"{where} at byte {ref.offset}: {problem}")
        start = ref.offset + HEADER_BYTES
        yield Entry(
            ref.term,
            ref.index,
            ref.kind,
            ref.shard,
            ref.hour,
            ref.part,
            data[start : start + ref.length],
        )


def read_payloads(path: Path, spans: Iterable[tuple[int, int]] | np.ndarray) -> list[bytes]:
    """The payloads of the records at ``spans`` ((offset, payload length) rows, as
    ``ReplicaLog.block_slices`` gives them), each read where it lies with ``pread``
    and verified: a slice of a big block costs its own bytes, not the file's."""
    rows = spans.tolist() if isinstance(spans, np.ndarray) else spans
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in rows:
            buf = os.pread(fd, HEADER_BYTES + length, offset)
            problem = _check_record(buf, 0)
            if problem is not None:
                raise CorruptSegment(f"{path} at byte {offset}: {problem}")
            out.append(buf[HEADER_BYTES:])
    finally:
        os.close(fd)
    return out


def read_one(fd: int, ref: RecordRef) -> Entry:
    """Read one record at a known place with ``pread``, verifying its checksum."""
    buf = os.pread(fd, HEADER_BYTES + ref.length, ref.offset)
    problem = _check_record(buf, 0)
    if problem is not None:
        raise CorruptSegment(f"record {ref.index} at byte {ref.offset}: {problem}")
    return Entry(ref.term, ref.index, ref.kind, ref.shard, ref.hour, ref.part, buf[HEADER_BYTES:])
