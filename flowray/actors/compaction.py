"""Compaction: the final hours of a shard-day merged into one file.

A one-site query over a day then opens one file instead of 24. Publishing into a merged
day later (late events) drops the merged file from the catalog in the same
transaction, so the hours are read again until the day is merged anew.
"""

from __future__ import annotations

import asyncio

from flowray.actors.mapreduce_driver import MapReduceDriver, new_job_id
from flowray.core.units import HOUR_MS
from flowray.warehouse.catalog import Catalog

COMPACT_PER_CYCLE = 8  # shard-days merged per processing cycle at most


class Compactor:
    def __init__(self, catalog: Catalog, driver: MapReduceDriver, lock: asyncio.Lock) -> None:
        self.catalog = catalog
        self.driver = driver
        self.lock = lock  # jobs, cycles, compaction and moves take turns
        self.merged_days = 0  # shard-days compacted into one file

    async def compact(self, limit: int = COMPACT_PER_CYCLE) -> int:
        """Merge up to ``limit`` shard-days of the current version that are final (wholly
        before the watermark) into one file each; returns how many were merged."""
        async with self.lock:
            version = self.catalog.version()
            watermark = self.catalog.watermark_ms()
            if watermark is None:
                return 0
            days = self.catalog.mergeable_days(version.version, watermark // HOUR_MS, limit)
            plans = [
                (shard, day, self.catalog.day_units(version.version, shard, day))
                for shard, day in days
            ]
            merged = await self.driver.merge(
                version.logic,
                new_job_id(),
                [(shard, day, [u.path for u in units]) for shard, day, units in plans],
            )
            done = 0
            for (shard, day, units), unit in zip(plans, merged, strict=True):
                made_from = [u.path for u in units]
                if await asyncio.to_thread(
                    self.catalog.add_merged, version.version, shard, day, made_from, unit
                ):
                    done += 1
            self.merged_days += done
            return done
