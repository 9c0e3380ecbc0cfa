"""Tests for flowray.storage.catalog: atomic publishes, forward-only cursors, sharing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flowray.storage.catalog import Catalog, Unit

HOUR = 438_000


def unit(shard: int, hour: int, tag: str = "a", events: int = 10) -> Unit:
    return Unit(shard, hour, f"/w/s{shard}/h{hour}.{tag}.parquet", 1, events // 2, events)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(tmp_path / "sub" / "catalog.sqlite")
    yield cat
    cat.close()


def test_a_new_catalog(catalog: Catalog) -> None:
    assert catalog.generation() == 0
    assert catalog.current_version() == 1
    assert catalog.watermark_ms() is None
    assert catalog.snapshot() == (0, 1, None)
    assert catalog.units(1) == []
    assert catalog.cursor(0) == 0
    assert catalog.summary() == {
        "generation": 0,
        "current_version": 1,
        "units": 0,
        "events": 0,
        "watermark_ms": None,
    }


def test_publish_bumps_generation_and_stores_units(catalog: Catalog) -> None:
    assert catalog.publish([unit(0, HOUR), unit(1, HOUR)], {0: 5}) == 1
    assert catalog.publish([unit(0, HOUR + 1)], {}) == 2
    assert catalog.generation() == 2
    assert catalog.units(1) == [unit(0, HOUR), unit(1, HOUR), unit(0, HOUR + 1)]
    assert catalog.summary()["events"] == 30
    assert catalog.summary()["units"] == 3


def test_publishing_nothing_still_bumps_generation(catalog: Catalog) -> None:
    assert catalog.publish([], {}) == 1
    assert catalog.generation() == 1


def test_republish_replaces_a_unit(catalog: Catalog) -> None:
    catalog.publish([unit(0, HOUR, "a", events=10)], {})
    catalog.publish([unit(0, HOUR, "b", events=12)], {})
    assert catalog.units(1) == [unit(0, HOUR, "b", events=12)]
    assert catalog.unit_paths(1, 0, HOUR, HOUR + 1) == [unit(0, HOUR, "b").path]


def test_a_failed_publish_changes_nothing(catalog: Catalog) -> None:
    catalog.publish([unit(0, HOUR)], {0: 3})

    def broken() -> Iterator[Unit]:
        yield unit(0, HOUR + 1)
        raise RuntimeError("job failed while listing its output")

    with pytest.raises(RuntimeError):
        catalog.publish(broken(), {0: 9})
    assert catalog.generation() == 1
    assert catalog.units(1) == [unit(0, HOUR)]
    assert catalog.cursor(0) == 3
    # The catalog is usable after the rollback.
    assert catalog.publish([unit(0, HOUR + 1)], {0: 9}) == 2
    assert catalog.cursor(0) == 9


def test_cursors_only_move_forward(catalog: Catalog) -> None:
    catalog.publish([], {0: 10, 1: 4})
    catalog.publish([], {0: 7, 1: 8})
    assert catalog.cursor(0) == 10
    assert catalog.cursor(1) == 8
    catalog.publish([], {0: 10})
    assert catalog.cursor(0) == 10
    assert catalog.cursor(2) == 0


def test_unit_paths_is_a_half_open_hour_range_of_one_shard(catalog: Catalog) -> None:
    units = [unit(s, HOUR + h) for s in (0, 1) for h in (3, 0, 2, 1)]
    catalog.publish(units, {})
    assert catalog.unit_paths(1, 0, HOUR, HOUR + 4) == [unit(0, HOUR + h).path for h in range(4)]
    assert catalog.unit_paths(1, 1, HOUR + 1, HOUR + 3) == [
        unit(1, HOUR + 1).path,
        unit(1, HOUR + 2).path,
    ]
    assert catalog.unit_paths(1, 0, HOUR + 2, HOUR + 2) == []
    assert catalog.unit_paths(1, 0, HOUR + 4, HOUR + 9) == []
    assert catalog.unit_paths(1, 7, HOUR, HOUR + 4) == []
    assert catalog.unit_paths(2, 0, HOUR, HOUR + 4) == []


def test_watermark_bumps_generation_only_when_it_changes(catalog: Catalog) -> None:
    catalog.set_watermark(1000)
    assert catalog.snapshot() == (1, 1, 1000)
    catalog.set_watermark(1000)
    assert catalog.snapshot() == (1, 1, 1000)
    catalog.set_watermark(2000)
    assert catalog.snapshot() == (2, 1, 2000)
    catalog.publish([], {})
    assert catalog.snapshot() == (3, 1, 2000)


def test_a_second_catalog_sees_the_first_ones_writes(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    first = Catalog(path)
    second = Catalog(path)
    try:
        assert second.snapshot() == (0, 1, None)
        first.publish([unit(0, HOUR)], {2: 11})
        first.set_watermark(5000)
        assert second.snapshot() == (2, 1, 5000)
        assert second.units(1) == [unit(0, HOUR)]
        assert second.cursor(2) == 11
        assert second.publish([unit(1, HOUR)], {2: 4}) == 3
        assert first.generation() == 3
        assert first.cursor(2) == 11
        assert first.unit_paths(1, 1, HOUR, HOUR + 1) == [unit(1, HOUR).path]
    finally:
        first.close()
        second.close()
    reopened = Catalog(path)
    try:
        assert reopened.snapshot() == (3, 1, 5000)
        assert reopened.summary()["units"] == 2
    finally:
        reopened.close()
