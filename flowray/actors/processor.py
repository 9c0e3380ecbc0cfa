"""The processor: seals due blocks, runs map-reduce over them, publishes the result.

One per cluster. This actor only wires the pieces and answers for them:

- the processing cycle (flowray.actors.processing_cycle): seal, map/reduce, publish,
  release, and the watermark;
- compaction of final shard-days (flowray.actors.compaction);
- re-processing, rollback and shard moves (flowray.actors.warehouse_jobs), the first
  two run as jobs by flowray.actors.jobs;
- supervision of the ingest gateways (flowray.actors.supervision).

The cycle and gateway supervision repeat in tasks of their own, so a gateway that
answers late never delays or skips processing. The cycle, compaction, jobs and moves
take turns on one lock, so a job sees a version nobody publishes into meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray

from flowray.actors import memtrim
from flowray.actors.compaction import COMPACT_PER_CYCLE, Compactor
from flowray.actors.directory import Directory
from flowray.actors.jobs import JobRunner
from flowray.actors.mapreduce_driver import MapReduceDriver
from flowray.actors.processing_cycle import ProcessingCycle
from flowray.actors.supervision import GatewaySupervisor, Schedule
from flowray.actors.warehouse_jobs import WarehouseJobs
from flowray.config import Settings
from flowray.warehouse.catalog import Catalog

log = logging.getLogger("flowray.processor")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Processor:
    def __init__(self, settings_json: dict[str, Any]) -> None:
        self.settings = settings = Settings.from_json(settings_json)
        self.catalog = catalog = Catalog(settings.warehouse_dir / "catalog.sqlite")
        directory = Directory(settings)
        lock = asyncio.Lock()  # bound to the actor's event loop at its first wait
        driver = MapReduceDriver(settings, directory, catalog)
        self.cycle = ProcessingCycle(settings, directory, catalog, driver, lock)
        self.compactor = Compactor(catalog, driver, lock)
        self.runner = JobRunner(lock, on_failure=driver.forget_masters)
        self.warehouse_jobs = WarehouseJobs(settings, catalog, driver, self.runner, lock)
        self.supervisor = GatewaySupervisor(settings)
        self.last_error = ""
        self.schedule = Schedule(self._report)
        interval = settings.process_interval_s
        self.schedule.every(interval, "processing cycle", self._cycle_step)
        self.schedule.every(interval, "gateway supervision", self.supervisor.keep_gateways)

    async def start(self) -> None:
        """Start the background work (also done by run and status, after a restart)."""
        self.schedule.start()

    async def _cycle_step(self) -> None:
        await self.run("due")
        await self.compact()
        await asyncio.to_thread(memtrim.trim)  # what the cycle freed goes back

    def _report(self, what: str, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("%s failed: %s", what, self.last_error)

    async def run(self, mode: str = "due") -> dict[str, Any]:
        """Seal what ``mode`` says is due, process every sealed block, publish."""
        await self.start()
        return await self.cycle.run(mode)

    async def keep_gateway(self) -> bool:
        """Start each ingest gateway's server if its actor came back from a crash
        without it; True if one had to."""
        return await self.supervisor.keep_gateways()

    async def compact(self, limit: int = COMPACT_PER_CYCLE) -> int:
        """Merge up to ``limit`` final shard-days into one file each; how many were."""
        await self.start()
        return await self.compactor.compact(limit)

    async def reprocess(
        self,
        start_ms: int,
        end_ms: int,
        sites: list[str] | None = None,
        logic: str | None = None,
        modules: list[str] | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Start re-processing the published hours overlapping [start_ms, end_ms).

        Checks the request at once (a bad one raises ValueError) and returns the job;
        progress and the result come from ``job``.
        """
        await self.start()
        return await self.warehouse_jobs.reprocess(start_ms, end_ms, sites, logic, modules, dry_run)

    async def rollback(self, to_version: int | None = None) -> dict[str, Any]:
        """Start returning to ``to_version`` (default: the current version's parent)."""
        await self.start()
        return await self.warehouse_jobs.rollback(to_version)

    async def move_shard(self, shard: int, to_group: int) -> dict[str, Any]:
        """Send ``shard``'s new writes to ``to_group`` from now on."""
        await self.start()
        return await self.warehouse_jobs.move_shard(shard, to_group)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return self.runner.get(job_id)

    async def versions(self) -> list[dict[str, Any]]:
        return [v.to_json() for v in await asyncio.to_thread(self.catalog.versions)]

    async def status(self) -> dict[str, Any]:
        await self.start()
        base_map = self.settings.base_map()
        return {
            "pid": os.getpid(),
            "jobs": self.cycle.published,
            "republished_units": self.cycle.republished_units,
            "merged_days": self.compactor.merged_days,
            "last_job": self.cycle.last_job,
            "last_error": self.last_error,
            "catalog": self.catalog.summary(),
            "cursors": {g: self.catalog.cursor(g) for g in range(self.settings.groups)},
            "versions": [v.to_json() for v in self.catalog.versions()],
            "shard_owners": base_map.with_moves(self.catalog.shard_moves()).to_json(),
            "jobs_running": self.runner.running(),
        }

    async def stop(self) -> None:
        await self.schedule.stop()
