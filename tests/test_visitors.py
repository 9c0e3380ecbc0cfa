"""Tests for flowray.query.visitors: exact while small, within 2% above, each visitor
counted once across buckets, and blobs that refuse to be misread."""

from __future__ import annotations

import itertools
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.query import visitors
from flowray.query.visitors import (
    EXACT_MAX,
    FORMAT_VERSION,
    VisitorSet,
    VisitorSetError,
    build_per_group,
)

HEADER = struct.Struct("<2sBBII")


def distinct_hashes(n: int, seed: int) -> np.ndarray:
    """n distinct uniform uint64 hashes."""
    rng = np.random.default_rng([404, seed])
    out = np.unique(rng.integers(0, 2**64, size=n + n // 100 + 8, dtype=np.uint64))
    assert out.size >= n
    return rng.permutation(out)[:n]


def blob(kind: int, payload: bytes, version: int = FORMAT_VERSION, magic: bytes = b"FV") -> bytes:
    """A blob with a valid checksum, to reach the checks behind it."""
    head = HEADER.pack(magic, version, kind, len(payload), 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def roundtrip(s: VisitorSet) -> VisitorSet:
    return VisitorSet.from_bytes(s.to_bytes())


# ---------------------------------------------------------------- exact while small


@pytest.mark.parametrize("n", [0, 1, 2, 10, 50, 99, 100])
def test_exact_up_to_the_threshold(n: int) -> None:
    assert EXACT_MAX >= 99  # "exact below 100 distinct visitors in a range"
    hashes = distinct_hashes(n, n)
    with_repeats = np.concatenate([hashes, hashes[: n // 2], hashes[:1]])[: 2 * n]
    s = VisitorSet.from_hashes(with_repeats)
    assert s.is_exact
    assert s.estimate() == n
    exact = s.exact_hashes()
    assert exact is not None
    assert np.array_equal(exact, np.sort(hashes))
    assert roundtrip(s).estimate() == n and roundtrip(s).is_exact


def test_the_threshold_is_exact_and_one_more_is_a_sketch() -> None:
    hashes = distinct_hashes(EXACT_MAX + 1, 7)
    assert VisitorSet.from_hashes(hashes[:EXACT_MAX]).is_exact
    above = VisitorSet.from_hashes(hashes)
    assert not above.is_exact
    assert above.exact_hashes() is None
    assert above.estimate() >= EXACT_MAX + 1
    assert abs(above.estimate() - (EXACT_MAX + 1)) <= 0.02 * (EXACT_MAX + 1)


def test_a_range_under_100_is_exact_however_many_buckets() -> None:
    """99 visitors over a day of minutes, each seen in many minutes: exactly 99."""
    rng = np.random.default_rng(3)
    ids = distinct_hashes(99, 3)
    hashes = ids[rng.integers(0, ids.size, size=5_000)]
    minutes = rng.integers(0, 1440, size=hashes.size)
    _keys, sets = build_per_group(minutes, hashes)
    assert sum(s.estimate() for s in sets) > 1000  # adding buckets would overcount
    union = VisitorSet.merge(roundtrip(s) for s in sets)
    assert union.is_exact and union.estimate() == 99


def test_int64_hashes_are_taken_bit_for_bit() -> None:
    hashes = distinct_hashes(300, 11)
    as_signed = hashes.view(np.int64)
    assert (as_signed < 0).any()
    assert VisitorSet.from_hashes(as_signed).to_bytes() == VisitorSet.from_hashes(hashes).to_bytes()
    small = VisitorSet.from_hashes(as_signed[:20])
    assert np.array_equal(small.exact_hashes(), np.sort(hashes[:20]))  # type: ignore[arg-type]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(TypeError):
        VisitorSet.from_hashes(np.array([1.5, 2.5]))
    with pytest.raises(ValueError):
        VisitorSet.from_hashes(np.zeros((2, 2), np.uint64))
    with pytest.raises(ValueError):
        build_per_group(np.arange(3), np.zeros(2, np.uint64))
    assert VisitorSet.from_hashes(np.array([])).estimate() == 0


# ---------------------------------------------------------------- within 2% above


@pytest.mark.parametrize(
    ("n", "seed"),
    [(1_000, 1), (1_000, 2), (10_000, 1), (10_000, 2), (100_000, 1), (1_000_000, 1)],
)
def test_within_two_percent(n: int, seed: int) -> None:
    """One bucket (its own estimator), and the same visitors split over 60 buckets
    (the merged estimator every multi-bucket range gets)."""
    hashes = distinct_hashes(n, seed)
    single = VisitorSet.from_hashes(hashes)
    merged = VisitorSet.merge(
        roundtrip(VisitorSet.from_hashes(p)) for p in np.array_split(hashes, 60)
    )
    for s in (single, merged):
        assert not s.is_exact
        assert abs(s.estimate() / n - 1) <= 0.02, (n, seed, s.estimate())


# ---------------------------------------------------------------- unions count once


def test_a_day_of_minutes_counts_each_visitor_once() -> None:
    rng = np.random.default_rng(5)
    distinct = 20_000
    ids = distinct_hashes(distinct, 5)
    hashes = np.repeat(ids, 1 + rng.poisson(3.0, size=distinct))
    minutes = rng.integers(0, 1440, size=hashes.size)
    keys, sets = build_per_group(minutes, hashes)
    assert keys.size == 1440
    assert sum(s.estimate() for s in sets) > 3 * distinct
    union = VisitorSet.merge(VisitorSet.from_bytes(s.to_bytes()) for s in sets)
    assert abs(union.estimate() / distinct - 1) <= 0.02


def test_visitors_already_in_a_sketch_add_nothing() -> None:
    """A sketch merged with itself, or with exact sets of its own visitors, is the
    same sketch: the same bytes and the same estimate."""
    hashes = distinct_hashes(10_000, 9)
    s = VisitorSet.from_hashes(hashes)
    twice = VisitorSet.merge([s, s])
    for again in (
        VisitorSet.merge([s, s, s]),
        VisitorSet.merge([s, VisitorSet.from_hashes(hashes[:40]), s]),
        VisitorSet.merge([VisitorSet.from_hashes(hashes[5000:5090]), s, s]),
        VisitorSet.merge([twice, VisitorSet.from_hashes(hashes[:3000])]),
    ):
        assert again.to_bytes() == twice.to_bytes()
    assert abs(twice.estimate() / s.estimate() - 1) < 0.02
    assert VisitorSet.merge([s]) is not None and VisitorSet.merge([s]).estimate() == s.estimate()
    assert VisitorSet.merge([s, VisitorSet.empty()]).to_bytes() == s.to_bytes()


def test_merging_many_exact_buckets_stays_bounded_and_equal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exact hashes gathered by a merge are folded into the sketch union as they pile
    up: the answer is the union of the same visitors (a merged sketch), and stays exact
    while the visitors are few."""
    rng = np.random.default_rng(13)
    ids = distinct_hashes(3_000, 13)
    picks = [ids[rng.integers(0, ids.size, 60)] for _ in range(400)]
    buckets = [VisitorSet.from_hashes(p) for p in picks]
    everyone = VisitorSet.from_hashes(np.concatenate(picks))
    small_ids = ids[:90]
    small = [VisitorSet.from_hashes(small_ids[rng.integers(0, 90, 30)]) for _ in range(400)]
    expected_small = VisitorSet.merge(small)
    assert VisitorSet.merge(buckets).to_bytes() == everyone.to_bytes()
    monkeypatch.setattr(visitors, "_PENDING_MAX", 500)
    folded = VisitorSet.merge(buckets)
    assert folded.to_bytes() == VisitorSet.merge([everyone, everyone]).to_bytes()
    assert abs(folded.estimate() / everyone.estimate() - 1) < 0.02
    folded_small = VisitorSet.merge(small)
    assert folded_small.is_exact and expected_small.is_exact
    assert folded_small.to_bytes() == expected_small.to_bytes()


# ---------------------------------------------------------------- merge laws


def _family() -> list[VisitorSet]:
    base = distinct_hashes(40_000, 17)
    return [
        VisitorSet.from_hashes(base[:50]),  # exact
        VisitorSet.from_hashes(base[30:110]),  # exact, overlaps the first
        VisitorSet.from_hashes(base[:5_000]),  # sketch
        VisitorSet.from_hashes(base[2_000:40_000]),  # sketch, overlaps the third
    ]


def test_merge_is_commutative_and_associative() -> None:
    sets = _family()
    reference = VisitorSet.merge(sets)
    for order in itertools.permutations(sets):
        assert VisitorSet.merge(order).to_bytes() == reference.to_bytes()
    a, b, c, d = sets
    for grouped in (
        ((a | b) | c) | d,
        a | (b | (c | d)),
        (a | c) | (b | d),
        VisitorSet.merge([a | d, VisitorSet.merge([c, b])]),
        VisitorSet.merge([roundtrip(a | b), roundtrip(c | d)]),
    ):
        assert grouped.to_bytes() == reference.to_bytes()
    assert abs(reference.estimate() / 40_000 - 1) <= 0.02


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 2**64 - 1), max_size=40),
        max_size=8,
    )
)
def test_exact_merge_is_the_set_union(buckets: list[list[int]]) -> None:
    sets = [VisitorSet.from_hashes(np.array(b, dtype=np.uint64)) for b in buckets]
    union = VisitorSet.merge(sets)
    expected = set().union(*buckets) if buckets else set()
    if len(expected) <= EXACT_MAX:
        assert union.is_exact
        assert union.exact_hashes().tolist() == sorted(expected)  # type: ignore[union-attr]
        assert VisitorSet.merge(reversed(sets)).to_bytes() == union.to_bytes()
    else:
        assert not union.is_exact and union.estimate() > EXACT_MAX


# ---------------------------------------------------------------- bytes


@pytest.mark.parametrize("n", [0, 1, 100, 101, 5_000, 200_000])
def test_bytes_round_trip(n: int) -> None:
    s = VisitorSet.from_hashes(distinct_hashes(n, 19))
    data = s.to_bytes()
    for form in (data, bytearray(data), memoryview(data)):
        back = VisitorSet.from_bytes(form)
        assert back.is_exact == s.is_exact
        assert back.estimate() == s.estimate()
        assert back.to_bytes() == data
    if s.is_exact:
        assert len(data) == 12 + 8 * n


def test_a_merged_sketch_round_trips() -> None:
    a, b, c, d = _family()
    merged = VisitorSet.merge([a, b, c, d])
    assert roundtrip(merged).to_bytes() == merged.to_bytes()
    assert roundtrip(merged).estimate() == merged.estimate()


@pytest.mark.parametrize("n", [0, 3, 5_000])
def test_every_truncation_and_every_flipped_byte_is_refused(n: int) -> None:
    data = VisitorSet.from_hashes(distinct_hashes(n, 23)).to_bytes()
    cuts = range(len(data)) if len(data) < 400 else [*range(40), *range(40, len(data), 97)]
    for cut in cuts:
        with pytest.raises(VisitorSetError):
            VisitorSet.from_bytes(data[:cut])
    with pytest.raises(VisitorSetError, match="truncated or padded"):
        VisitorSet.from_bytes(data + b"\0")
    positions = range(len(data)) if len(data) < 400 else range(0, len(data), 13)
    for i in positions:
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            with pytest.raises(VisitorSetError):
                VisitorSet.from_bytes(bytes(bad))


def test_clear_errors_behind_a_valid_checksum() -> None:
    sorted_hashes = np.sort(distinct_hashes(10, 29)).astype("<u8")
    cases = {
        "not a visitor set": blob(0, b"", magic=b"XX"),
        "version 9 unknown": blob(0, b"", version=9),
        "unknown kind 7": blob(7, b""),
        "bytes of exact hashes": blob(0, b"\0" * 12),
        "not sorted and unique": blob(0, sorted_hashes[::-1].tobytes()),
        "repeat": blob(0, np.repeat(sorted_hashes[:2], 2).tobytes()),
        "more than": blob(0, np.arange(EXACT_MAX + 1, dtype="<u8").tobytes()),
        "bad CPC sketch": blob(1, b"\x01\x02\x03\x04garbage"),
        "empty CPC": blob(1, b""),
    }
    for what, data in cases.items():
        with pytest.raises(VisitorSetError) as caught:
            VisitorSet.from_bytes(data)
        assert str(caught.value).startswith(("visitor set", "not a visitor set")), what
    with pytest.raises(VisitorSetError, match="checksum"):
        bad = bytearray(VisitorSet.from_hashes(sorted_hashes).to_bytes())
        bad[-1] ^= 1
        VisitorSet.from_bytes(bytes(bad))


def test_a_sketch_of_another_size_is_refused() -> None:
    import datasketches

    other = datasketches.cpc_sketch(visitors.LG_K + 1)
    for value in range(1000):
        other.update(value)
    with pytest.raises(VisitorSetError, match="lg_k"):
        VisitorSet.from_bytes(blob(1, bytes(other.serialize())))


def test_the_error_is_a_value_error() -> None:
    assert issubclass(VisitorSetError, ValueError)


# ---------------------------------------------------------------- per-group builder


def test_the_grouped_builder_equals_building_each_group() -> None:
    rng = np.random.default_rng(31)
    ids = distinct_hashes(30_000, 31)
    sizes = [1, 2, 50, EXACT_MAX, EXACT_MAX + 1, 400, 3_000, 20_000]
    keys_list, hashes_list = [], []
    for i, size in enumerate(sizes):
        site, minute = i % 3, 1000 + i
        pool = ids[rng.integers(0, ids.size, size)]
        keys_list.append(np.full(2 * size, (site << 32) | minute, np.int64))
        hashes_list.append(np.concatenate([pool, pool[rng.permutation(size)]]))
    keys = np.concatenate(keys_list)
    hashes = np.concatenate(hashes_list)
    shuffle = rng.permutation(keys.size)
    keys, hashes = keys[shuffle], hashes[shuffle]
    distinct, sets = build_per_group(keys, hashes)
    assert distinct.tolist() == sorted(set(keys.tolist()))
    assert len(sets) == distinct.size
    for key, s in zip(distinct, sets, strict=True):
        alone = VisitorSet.from_hashes(hashes[keys == key])
        assert s.to_bytes() == alone.to_bytes(), key
    assert [s.is_exact for s in sets] == [n <= EXACT_MAX for n in sorted_sizes(keys, hashes)]


def sorted_sizes(keys: np.ndarray, hashes: np.ndarray) -> list[int]:
    return [np.unique(hashes[keys == k]).size for k in np.unique(keys)]


def test_the_grouped_builder_takes_any_sortable_keys() -> None:
    keys = np.array(["b.com", "a.com", "b.com", "a.com", "c.com"])
    hashes = np.array([5, 6, 5, 7, 2**63 + 1], dtype=np.uint64)
    distinct, sets = build_per_group(keys, hashes)
    assert distinct.tolist() == ["a.com", "b.com", "c.com"]
    assert [s.exact_hashes().tolist() for s in sets] == [[6, 7], [5], [2**63 + 1]]  # type: ignore[union-attr]
    empty_keys, empty_sets = build_per_group(np.array([], np.int64), np.array([], np.uint64))
    assert empty_keys.size == 0 and empty_sets == []


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 2**64 - 1) | st.integers(0, 30)),
        max_size=400,
    )
)
def test_grouped_builder_property(pairs: list[tuple[int, int]]) -> None:
    keys = np.array([k for k, _ in pairs], np.int64)
    hashes = np.array([h for _, h in pairs], np.uint64)
    distinct, sets = build_per_group(keys, hashes)
    assert distinct.tolist() == sorted({k for k, _ in pairs})
    for key, s in zip(distinct.tolist(), sets, strict=True):
        assert s.to_bytes() == VisitorSet.from_hashes(hashes[keys == key]).to_bytes()


def test_repr_says_the_kind() -> None:
    assert repr(VisitorSet.from_hashes(np.array([1, 2], np.uint64))) == "VisitorSet(exact, 2)"
    assert repr(VisitorSet.from_hashes(distinct_hashes(500, 1))).startswith("VisitorSet(sketch, ")
