"""How the processor packs block slices into map tasks (pure parts, no Ray cluster)."""

from __future__ import annotations

from flowray.actors.mapreduce_driver import _pack

MB = 1024 * 1024


def test_packs_hold_about_bytes_max_and_never_mix_groups() -> None:
    slices = [((s, 7), s % 2, (s, 7, 0), i, 3, 10 * MB) for s in range(4) for i in range(3)]
    slices.sort(key=lambda x: x[1])  # as the processor does: by group
    packs = _pack(slices, 32 * MB)
    assert sum(len(p) for p in packs) == len(slices)
    for pack in packs:
        assert len({item[1] for item in pack}) == 1, "a pack reads one group's files"
        assert sum(item[-1] for item in pack) <= 32 * MB or len(pack) == 1
    # 6 slices of 10 MB per group: 3 + 3 per group, no pack crossing the group boundary
    assert [len(p) for p in packs] == [3, 3, 3, 3]


def test_a_slice_bigger_than_bytes_max_gets_a_pack_of_its_own() -> None:
    slices = [((0, 1), 0, (0, 1, 0), 0, 1, 100 * MB), ((1, 1), 0, (1, 1, 0), 0, 1, MB)]
    assert [len(p) for p in _pack(slices, 32 * MB)] == [1, 1]
    assert _pack([], 32 * MB) == []
