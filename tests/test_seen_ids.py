"""Tests for live.SeenIds: which (site, id) pairs were counted, in C and in Python."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.query import live
from flowray.query.live import SeenIds

native = pytest.importorskip("flowray.ingest._native")


def python_seen() -> SeenIds:
    """The fallback a machine without the C extension runs."""
    seen = SeenIds()
    seen._table = None
    return seen


def expected_keep(pairs: list[tuple[str, str | None]], before: set[tuple[str, str]]) -> list[bool]:
    keep = []
    for site, event_id in pairs:
        if event_id is None:
            keep.append(True)
        else:
            keep.append((site, event_id) not in before)
            before.add((site, event_id))
    return keep


names = st.sampled_from(["a.com", "b.com", "", "é.fr", "x" * 9, "x" * 17])
ids = st.one_of(st.none(), st.sampled_from(["1", "2", "", "abcdefgh", "abcdefgh\x00", "zz"]))


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.lists(st.tuples(names, ids), max_size=40), min_size=1, max_size=6),
    cut=st.integers(0, 3),
)
def test_c_and_python_keep_the_same_rows(
    batches: list[list[tuple[str, str | None]]], cut: int
) -> None:
    """Row by row the first of each (site, id) counts, every row without an id counts,
    and sliced arrays (a non-zero offset into their buffers) read the right rows."""
    in_c, in_python, truth = SeenIds(), python_seen(), set()
    for batch in batches:
        padded = [("pad.com", "pad")] * cut + batch
        sites = pa.array([s for s, _ in padded], pa.string()).slice(cut)
        event_ids = pa.array([i for _, i in padded], pa.string()).slice(cut)
        want = expected_keep(batch, truth)
        assert in_c.first(sites, event_ids).tolist() == want
        assert in_python.first(sites, event_ids).tolist() == want
    assert len(in_c) == len(in_python) == len(truth)


def test_many_pairs_grow_the_table_and_stay_small() -> None:
    """300,000 pairs: each counts once, none twice, at under 40 bytes a pair."""
    seen = SeenIds()
    sites = pa.array([f"site{i % 97}.example.com" for i in range(1000)])
    for k in range(300):
        batch = pa.array([f"ev-{k}-{i}" for i in range(1000)])
        assert seen.first(sites, batch).all()
    assert len(seen) == 300_000
    assert not seen.first(sites, pa.array([f"ev-7-{i}" for i in range(1000)])).any()
    assert seen.first(sites.slice(1, 10), pa.array([f"ev-7-{i}" for i in range(10)])).all()
    pairs, table_bytes = native.seen_size(seen._table)
    assert pairs == 300_010 and table_bytes / pairs < 40


def test_other_string_types_are_the_same_pairs() -> None:
    """A pair seen in a column of large strings is the same pair in a plain one."""
    seen = SeenIds()
    large = pa.array(["a.com", "a.com"], pa.large_string())
    assert seen.first(large, pa.array(["x", "x"], pa.large_string())).tolist() == [True, False]
    assert seen.first(pa.array(["a.com", "a.com"]), pa.array(["y", "x"])).tolist() == [True, False]
    assert len(seen) == 2
    for site, event_id in ((["a.com"], [[1]]), (["a.com"], [5]), ([1], ["5"])):
        with pytest.raises(TypeError):  # not strings: refused, nothing added
            seen.first(pa.array(site), pa.array(event_id))
    assert len(seen) == 2


def test_bad_buffers_are_refused_and_add_nothing() -> None:
    seen = native.seen_new()
    sites = pa.array(["a.com", "b.com"])
    event_ids = pa.array(["1", "2"])
    _v, site_offsets, site_data = sites.buffers()
    _v, id_offsets, id_data = event_ids.buffers()
    with pytest.raises(ValueError, match="shorter"):
        native.first_seen(seen, 3, site_offsets, site_data, 0, id_offsets, id_data, None, 0)
    with pytest.raises(ValueError, match="shorter"):
        native.first_seen(seen, 2, site_offsets, site_data, 1, id_offsets, id_data, None, 0)
    with pytest.raises(ValueError, match="shorter"):
        native.first_seen(seen, -1, site_offsets, site_data, 0, id_offsets, id_data, None, 0)
    with pytest.raises(ValueError, match="shorter"):  # a validity bitmap of one byte: 8 rows
        native.first_seen(seen, 2, site_offsets, site_data, 0, id_offsets, id_data, b"\x03", 7)
    bad_offsets = (pa.array([0, 5, 999], pa.int32())).buffers()[1]  # past the data
    with pytest.raises(ValueError, match="out of range"):
        native.first_seen(seen, 2, site_offsets, site_data, 0, bad_offsets, id_data, None, 0)
    with pytest.raises(ValueError):  # not a set from seen_new
        native.first_seen(object(), 0, b"", b"", 0, b"", b"", None, 0)
    assert native.seen_size(seen)[0] == 0  # nothing was added by any of them
    keep = native.first_seen(seen, 2, site_offsets, site_data, 0, id_offsets, id_data, None, 0)
    assert keep == b"\x01\x01" and native.seen_size(seen)[0] == 2


def test_live_counts_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts are the same when the C extension is not built."""
    monkeypatch.setattr(live, "_native", None)
    seen = SeenIds()
    assert seen._table is None
    keep = seen.first(pa.array(["a", "a", "b", "a"]), pa.array(["1", "1", "1", None]))
    assert keep.tolist() == [True, False, True, True] and len(seen) == 2
