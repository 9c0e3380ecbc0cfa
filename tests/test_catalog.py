"""Tests for flowray.warehouse.catalog: atomic publishes, forward-only cursors, sharing."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowray.warehouse.catalog import Catalog, CatalogError, Unit

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


def test_a_reprocessed_version_copies_its_parent_and_replaces_some_units(
    catalog: Catalog,
) -> None:
    catalog.publish([unit(0, HOUR), unit(1, HOUR), unit(0, HOUR + 1)], {0: 3})
    version, generation = catalog.create_version(
        1, "no-bots", ("my.logic",), [unit(0, HOUR, "v2", events=6)], "fix"
    )
    assert (version, generation) == (2, 2)
    assert catalog.current_version() == 2
    assert catalog.units(2) == [unit(0, HOUR, "v2", events=6), unit(1, HOUR), unit(0, HOUR + 1)]
    assert catalog.units(1) == [unit(0, HOUR), unit(1, HOUR), unit(0, HOUR + 1)]  # kept
    v2 = catalog.version()
    assert (v2.version, v2.logic, v2.modules, v2.parent, v2.note) == (
        2,
        "no-bots",
        ("my.logic",),
        1,
        "fix",
    )
    assert (v2.units, v2.events, v2.current) == (3, 26, True)
    # Regular processing now publishes into version 2 only.
    catalog.publish([unit(0, HOUR + 2)], {0: 4}, version=2)
    assert len(catalog.units(2)) == 4 and len(catalog.units(1)) == 3


def test_a_version_switch_is_refused_when_the_parent_is_no_longer_current(
    catalog: Catalog,
) -> None:
    catalog.create_version(1, "no-bots", (), [], "a")
    with pytest.raises(CatalogError, match="no longer current"):
        catalog.create_version(1, "other", (), [], "b")
    with pytest.raises(CatalogError, match="no longer current"):
        catalog.publish([unit(0, HOUR)], {}, version=1)
    with pytest.raises(CatalogError, match="no warehouse version 7"):
        catalog.switch(2, 7, [])
    assert [v.version for v in catalog.versions()] == [1, 2]
    assert catalog.units(2) == []


def test_switching_back_brings_units_up_to_date_atomically(catalog: Catalog) -> None:
    catalog.publish([unit(0, HOUR)], {})
    catalog.create_version(1, "no-bots", (), [unit(0, HOUR, "v2")], "x")
    catalog.publish([unit(0, HOUR + 1, "v2")], {}, version=2)
    generation = catalog.generation()
    assert catalog.switch(2, 1, [unit(0, HOUR + 1, "v1again")]) == generation + 1
    assert catalog.current_version() == 1
    assert catalog.units(1) == [unit(0, HOUR), unit(0, HOUR + 1, "v1again")]
    assert [v.current for v in catalog.versions()] == [True, False]


def test_an_older_catalog_gains_the_version_columns(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "CREATE TABLE versions (version INTEGER PRIMARY KEY, logic TEXT NOT NULL,"
        " created_ms INTEGER NOT NULL);"
        "INSERT INTO versions VALUES (1, 'default', 5);"
        "INSERT INTO meta VALUES ('current_version', 1), ('generation', 4), ('identity', 9);"
    )
    db.commit()
    db.close()
    catalog = Catalog(path)
    (v1,) = catalog.versions()
    assert (v1.version, v1.logic, v1.parent, v1.modules) == (1, "default", None, ())
    assert v1.created_ms == 5
    assert catalog.generation() == 4
    catalog.close()
