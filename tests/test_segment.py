"""Tests for flowray.storage.segment: framing, torn tails, corruption, record reads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.core.invariant import InvariantError
from flowray.storage import segment
from flowray.storage.segment import (
    CONTROL_SHARD,
    HEADER_BYTES,
    KIND_DATA,
    KIND_NOOP,
    KIND_SEAL,
    CorruptSegment,
    Entry,
    encode,
    read_entries,
    read_one,
    recover,
    scan,
)

HOUR = 438_000  # an hour since the epoch, in 2019
LENGTH_FIELD = range(12, 16)  # bytes of the u32 length inside a record header


def make_entries(sizes: list[int], term: int = 1) -> list[Entry]:
    kinds = (KIND_DATA, KIND_SEAL, KIND_NOOP)
    return [
        Entry(term, i, kinds[i % 3], i % 7, HOUR + i, i % 2, bytes((i + j) % 256 for j in range(n)))
        for i, n in enumerate(sizes, start=1)
    ]


def image(entries: list[Entry]) -> tuple[bytes, list[int]]:
    """The segment bytes of ``entries`` and the offset where each record starts."""
    frames = [encode(e) for e in entries]
    starts = [sum(len(f) for f in frames[:k]) for k in range(len(frames))]
    return b"".join(frames), starts


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


entry_sizes = st.lists(st.integers(0, 80), min_size=1, max_size=5)


# --------------------------------------------------------------------------- round trip


def test_header_is_36_bytes() -> None:
    assert HEADER_BYTES == 36
    assert len(encode(Entry(1, 1, KIND_DATA, 0, 0, 0))) == HEADER_BYTES


@given(sizes=entry_sizes, term=st.integers(1, 2**63))
@settings(max_examples=50, deadline=None)
def test_round_trip(sizes: list[int], term: int) -> None:
    entries = make_entries(sizes, term)
    data, starts = image(entries)
    refs, good = scan(data)
    assert good == len(data)
    assert [r.offset for r in refs] == starts
    assert [(r.index, r.term, r.kind, r.shard, r.hour, r.part, r.length) for r in refs] == [
        (e.index, e.term, e.kind, e.shard, e.hour, e.part, len(e.payload)) for e in entries
    ]
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "x.seg", data)
        assert list(read_entries(path)) == entries
        assert recover(path) == refs
        assert path.read_bytes() == data


def test_extreme_header_values_round_trip(tmp_path: Path) -> None:
    entry = Entry(2**64 - 1, 2**64 - 1, KIND_SEAL, CONTROL_SHARD, 2**32 - 1, 2**16 - 1, b"x")
    path = write(tmp_path / "x.seg", encode(entry))
    assert list(read_entries(path)) == [entry]


def test_empty_segment() -> None:
    assert scan(b"") == ([], 0)


def test_read_only_selected_refs(tmp_path: Path) -> None:
    entries = make_entries([3, 4, 5])
    data, _ = image(entries)
    path = write(tmp_path / "x.seg", data)
    refs, _ = scan(data)
    assert list(read_entries(path, [refs[2], refs[0]])) == [entries[2], entries[0]]


# --------------------------------------------------------------------------- torn tails


def test_recover_cuts_the_last_record_at_every_offset(tmp_path: Path) -> None:
    entries = make_entries([5, 0, 17, 40])
    data, starts = image(entries)
    last = starts[-1]
    path = tmp_path / "x.seg"
    for cut in range(last, len(data)):
        write(path, data[:cut])
        refs = recover(path)
        assert [r.index for r in refs] == [1, 2, 3], f"cut at byte {cut}"
        assert path.stat().st_size == last, f"cut at byte {cut}"
        assert list(read_entries(path)) == entries[:3]


@given(sizes=entry_sizes)
@settings(max_examples=40, deadline=None)
def test_scan_keeps_whole_records_at_any_cut(sizes: list[int]) -> None:
    entries = make_entries(sizes)
    data, starts = image(entries)
    bounds = [*starts, len(data)]
    for cut in range(len(data) + 1):
        refs, good = scan(data[:cut])
        whole = max(k for k, b in enumerate(bounds) if b <= cut)
        assert good == bounds[whole]
        assert [r.index for r in refs] == [e.index for e in entries[:whole]]


@pytest.mark.parametrize("zeros", [1, 35, 36, 37, 4096])
def test_recover_cuts_a_tail_of_zeros(tmp_path: Path, zeros: int) -> None:
    entries = make_entries([5, 6])
    data, _ = image(entries)
    path = write(tmp_path / "x.seg", data + b"\x00" * zeros)
    assert [r.index for r in recover(path)] == [1, 2]
    assert path.read_bytes() == data


def test_zeros_only_file_is_emptied(tmp_path: Path) -> None:
    path = write(tmp_path / "x.seg", b"\x00" * 100)
    assert recover(path) == []
    assert path.stat().st_size == 0


def test_recover_cuts_a_partial_record_padded_with_zeros_to_its_length(tmp_path: Path) -> None:
    """The record's missing bytes read as zeros, ending exactly at the end of the file."""
    entries = make_entries([5, 60])
    data, starts = image(entries)
    torn = data[: starts[1] + HEADER_BYTES + 10]
    path = write(tmp_path / "x.seg", torn + b"\x00" * (len(data) - len(torn)))
    assert [r.index for r in recover(path)] == [1]
    assert path.stat().st_size == starts[1]


def test_recover_cuts_a_partial_record_followed_by_zeros(tmp_path: Path) -> None:
    entries = make_entries([5, 60, 30])
    data, starts = image(entries)
    # Records 2 and 3 were written in one batch, never fsynced; the file system kept the
    # new size but only the first page of record 2: zeros from there to the end.
    torn = data[: starts[1] + HEADER_BYTES + 10]
    path = write(tmp_path / "x.seg", torn + b"\x00" * (len(data) - len(torn)))
    assert [r.index for r in recover(path)] == [1]
    assert path.stat().st_size == starts[1]


def test_read_entries_refuses_an_uncut_torn_tail(tmp_path: Path) -> None:
    data, _ = image(make_entries([5, 6]))
    path = write(tmp_path / "x.seg", data[:-1])
    with pytest.raises(InvariantError):
        list(read_entries(path))


# --------------------------------------------------------------------------- corruption


def flip_offsets(starts: list[int], data: bytes, *, length_field: bool) -> list[int]:
    """Byte offsets inside every record but the last, in or out of the length field."""
    out = []
    bounds = [*starts, len(data)]
    for k in range(len(starts) - 1):
        for off in range(bounds[k], bounds[k + 1]):
            in_length = off - bounds[k] in LENGTH_FIELD
            if in_length == length_field:
                out.append(off)
    return out


@pytest.mark.parametrize("mask", [0xFF, 0x01, 0x80])
def test_flipped_byte_in_earlier_record_is_corruption(tmp_path: Path, mask: int) -> None:
    entries = make_entries([3, 20, 8])
    data, starts = image(entries)
    path = tmp_path / "x.seg"
    offsets = flip_offsets(starts, data, length_field=False)
    assert len(offsets) == starts[-1] - len(LENGTH_FIELD) * (len(starts) - 1)
    for off in offsets:
        bad = bytearray(data)
        bad[off] ^= mask
        with pytest.raises(CorruptSegment):
            scan(bytes(bad))
        write(path, bytes(bad))
        with pytest.raises(CorruptSegment):
            recover(path)
        assert path.read_bytes() == bytes(bad), "a corrupt segment must not be cut"


def test_flipped_length_byte_in_earlier_record_is_corruption(tmp_path: Path) -> None:
    entries = make_entries([3, 20, 8])
    data, starts = image(entries)
    path = tmp_path / "x.seg"
    for off in flip_offsets(starts, data, length_field=True):
        bad = bytearray(data)
        bad[off] ^= 0xFF
        write(path, bytes(bad))
        with pytest.raises(CorruptSegment):
            recover(path)
        assert path.read_bytes() == bytes(bad), "good records were cut"


@given(sizes=st.lists(st.integers(0, 40), min_size=2, max_size=4), data=st.data())
@settings(max_examples=60, deadline=None)
def test_flipped_bit_outside_length_field_never_reads_wrong_data(
    sizes: list[int], data: st.DataObject
) -> None:
    entries = make_entries(sizes)
    raw, starts = image(entries)
    offsets = flip_offsets(starts, raw, length_field=False)
    off = data.draw(st.sampled_from(offsets))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(raw)
    bad[off] ^= 1 << bit
    with pytest.raises(CorruptSegment):
        scan(bytes(bad))


def test_read_one_detects_a_flipped_payload_byte(tmp_path: Path) -> None:
    entries = make_entries([10, 30, 10])
    data, starts = image(entries)
    path = write(tmp_path / "x.seg", data)
    refs, _ = scan(data)
    fd = os.open(path, os.O_RDWR)
    try:
        assert read_one(fd, refs[1]) == entries[1]
        os.pwrite(
            fd, bytes([data[starts[1] + HEADER_BYTES + 7] ^ 0x10]), starts[1] + HEADER_BYTES + 7
        )
        with pytest.raises(CorruptSegment):
            read_one(fd, refs[1])
        assert read_one(fd, refs[0]) == entries[0]
        assert read_one(fd, refs[2]) == entries[2]
    finally:
        os.close(fd)


def test_read_one_detects_a_flipped_header_byte(tmp_path: Path) -> None:
    entries = make_entries([10, 30])
    data, starts = image(entries)
    path = write(tmp_path / "x.seg", data)
    refs, _ = scan(data)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([data[starts[1] + 30] ^ 0x01]), starts[1] + 30)  # in the index
        with pytest.raises(CorruptSegment):
            read_one(fd, refs[1])
    finally:
        os.close(fd)


def test_read_entries_detects_corruption(tmp_path: Path) -> None:
    entries = make_entries([10, 30])
    data, starts = image(entries)
    path = write(tmp_path / "x.seg", data)
    refs, _ = scan(data)
    bad = bytearray(data)
    bad[starts[1] + HEADER_BYTES] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(CorruptSegment):
        list(read_entries(path, refs))


# --------------------------------------------------------------------------- encode checks


@pytest.mark.parametrize(
    "entry",
    [
        Entry(1, 1, 0, 0, 0, 0),
        Entry(1, 1, 4, 0, 0, 0),
        Entry(0, 1, KIND_DATA, 0, 0, 0),
        Entry(1, 0, KIND_DATA, 0, 0, 0),
        Entry(-1, 1, KIND_DATA, 0, 0, 0),
    ],
)
def test_encode_refuses_bad_entries(entry: Entry) -> None:
    with pytest.raises(InvariantError):
        encode(entry)


def test_encode_refuses_an_oversized_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment, "PAYLOAD_BYTES_MAX", 16)
    assert encode(Entry(1, 1, KIND_DATA, 0, 0, 0, b"x" * 16))
    with pytest.raises(InvariantError):
        encode(Entry(1, 1, KIND_DATA, 0, 0, 0, b"x" * 17))
