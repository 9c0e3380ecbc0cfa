"""Compaction: a shard's final day merged into one file answers exactly what its hourly
files did, and a later publish into that day (late events) goes back to the hours."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from flowray.core.router import shard_for_site
from flowray.warehouse.catalog import DAY_HOURS, Catalog, Unit
from flowray.warehouse.files import Warehouse, merge_day, merged_path, unit_path, write_unit

SHARDS = 2
DAY = 18_335  # 2020-03-14
SITES = [f"s{i}.example" for i in range(40)]


def hour_unit(root: Path, shard: int, hour: int, rng: random.Random, job: str) -> Unit:
    sites = sorted(s for s in SITES if shard_for_site(s, SHARDS) == shard)
    rows = [
        (site, hour * 3_600_000 + m * 60_000, rng.randrange(1, 9))
        for site in sites
        for m in sorted(rng.sample(range(60), 5))
    ]
    table = pa.table(
        {
            "site": [r[0] for r in rows],
            "minute": pa.array([r[1] for r in rows], pa.timestamp("ms", tz="UTC")),
            "count": [r[2] for r in rows],
        }
    )
    path = unit_path(root, "default", shard, hour, job)
    write_unit(path, table)
    return Unit(shard, hour, str(path), 1, len(rows), sum(r[2] for r in rows))


def answers(warehouse: Warehouse, version: int) -> dict[str, list[tuple[int, int]]]:
    lo, hi = DAY * 86_400_000, (DAY + 1) * 86_400_000
    out = {}
    for site in SITES:
        minutes, counts = warehouse.minutes(site, lo - 3_600_000, hi + 3_600_000, version)
        order = np.argsort(minutes)
        out[site] = list(zip(minutes[order].tolist(), counts[order].tolist(), strict=True))
    return out


def test_a_merged_day_answers_what_its_hours_did(tmp_path: Path) -> None:
    rng = random.Random(5)
    warehouse = Warehouse(tmp_path, SHARDS)
    catalog: Catalog = warehouse.catalog
    first = DAY * DAY_HOURS
    hours = [first + h for h in (0, 1, 5, 23)] + [first + DAY_HOURS]  # and the next day
    units = [hour_unit(tmp_path, shard, h, rng, "a") for shard in range(SHARDS) for h in hours]
    catalog.publish(units, {})
    before = answers(warehouse, 1)
    generation = catalog.generation()

    assert catalog.mergeable_days(1, first + DAY_HOURS, 10) == [(0, DAY), (1, DAY)]
    for shard in range(SHARDS):
        day_units = catalog.day_units(1, shard, DAY)
        out = merged_path(tmp_path, "default", shard, DAY, "m1")
        rows, events = merge_day([u.path for u in day_units], out)
        assert events == sum(u.events for u in day_units)
        merged = Unit(shard, first, str(out), 0, rows, events)
        assert catalog.add_merged(1, shard, DAY, [u.path for u in day_units], merged)
        paths = catalog.unit_paths(1, shard, first - 1, first + DAY_HOURS + 1)
        assert paths[0] == str(out) and len(paths) == 2  # the merged day + the next hour
    assert catalog.mergeable_days(1, first + DAY_HOURS, 10) == []
    assert answers(warehouse, 1) == before
    assert catalog.generation() == generation  # same answers: caches stay valid

    # Late events re-publish hour 5 of shard 0: that day reads its hours again.
    late = hour_unit(tmp_path, 0, first + 5, rng, "late")
    catalog.publish([late], {})
    assert late.path in catalog.unit_paths(1, 0, first, first + DAY_HOURS)
    assert len(catalog.unit_paths(1, 1, first, first + DAY_HOURS)) == 1  # shard 1 still merged
    expected = answers(warehouse, 1)
    # A merge made from the old hours is refused: they changed meanwhile.
    stale = [u.path for u in units if u.shard == 0 and u.hour // DAY_HOURS == DAY]
    unit = Unit(0, first, "/nowhere", 0, 0, 0)
    assert not catalog.add_merged(1, 0, DAY, stale, unit)
    assert catalog.mergeable_days(1, first + DAY_HOURS, 10) == [(0, DAY)]
    day_units = catalog.day_units(1, 0, DAY)
    out = merged_path(tmp_path, "default", 0, DAY, "m2")
    rows, events = merge_day([u.path for u in day_units], out)
    assert catalog.add_merged(
        1, 0, DAY, [u.path for u in day_units], Unit(0, first, str(out), 0, rows, events)
    )
    assert answers(warehouse, 1) == expected


def test_a_new_version_keeps_merged_days_it_did_not_touch(tmp_path: Path) -> None:
    rng = random.Random(6)
    catalog = Catalog(tmp_path / "catalog.sqlite")
    first = DAY * DAY_HOURS
    units = [hour_unit(tmp_path, 0, first + h, rng, "a") for h in (0, 1)]
    units += [hour_unit(tmp_path, 0, first + DAY_HOURS + h, rng, "a") for h in (0, 1)]
    catalog.publish(units, {})
    for day in (DAY, DAY + 1):
        paths = [u.path for u in catalog.day_units(1, 0, day)]
        catalog.add_merged(1, 0, day, paths, Unit(0, day * DAY_HOURS, f"/m{day}", 0, 1, 1))
    redone = hour_unit(tmp_path, 0, first + DAY_HOURS, rng, "v2")
    catalog.create_version(1, "no-bots", (), [redone], "x")
    assert catalog.unit_paths(2, 0, first, first + DAY_HOURS) == [f"/m{DAY}"]
    assert redone.path in catalog.unit_paths(2, 0, first + DAY_HOURS, first + 2 * DAY_HOURS)
    assert catalog.unit_paths(1, 0, first + DAY_HOURS, first + 2 * DAY_HOURS) == [f"/m{DAY + 1}"]
