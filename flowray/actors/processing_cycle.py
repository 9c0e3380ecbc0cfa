"""One processing cycle: seal, map/reduce, publish, release, and the watermark.

Each cycle asks every group master to seal what is due, collects the committed seals
past the group's cursor in the catalog, re-processes every (shard, hour) unit they
touch from all of its sealed parts, and publishes the new unit files and the moved
cursors in one catalog transaction. A crash anywhere before that transaction leaves
the catalog as it was, and the next cycle redoes the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from flowray.actors.directory import Directory
from flowray.actors.mapreduce_driver import MapReduceDriver, Target, new_job_id
from flowray.config import Settings
from flowray.core.replication import NotMaster
from flowray.core.units import HOUR_MS
from flowray.warehouse.catalog import Catalog, Unit

# Runs of one processing cycle that found a master gone, and the pause between them
# (an election takes 0.5-1 s at the default timing).
RUN_ATTEMPTS = 3
RUN_RETRY_S = 1.0
Work = dict[int, list[dict[str, int]]]  # group -> its sealed blocks past the cursor
log = logging.getLogger("flowray.processor")


def now_ms() -> int:
    return int(time.time() * 1000)


class ProcessingCycle:
    def __init__(
        self,
        settings: Settings,
        directory: Directory,
        catalog: Catalog,
        driver: MapReduceDriver,
        lock: asyncio.Lock,
        clock_ms: Callable[[], int] = now_ms,
        retry_s: float = RUN_RETRY_S,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.catalog = catalog
        self.driver = driver
        self.lock = lock  # jobs, cycles, compaction and moves take turns
        self.clock_ms = clock_ms
        self.retry_s = retry_s
        self.published = 0  # cycles that published something
        self.republished_units = 0  # units published again because late events came
        self.last_job: dict[str, Any] = {}

    async def run(self, mode: str = "due") -> dict[str, Any]:
        """Seal what ``mode`` says is due, process every sealed block, publish. A run
        that met a replica no longer master (a failover since the masters were looked
        up) starts over with the new masters, up to RUN_ATTEMPTS times."""
        async with self.lock:
            for attempt in range(1, RUN_ATTEMPTS + 1):
                try:
                    return await self._run_locked(mode)
                except Exception as exc:
                    self.driver.forget_masters()
                    inner = getattr(exc, "cause", None) or exc
                    if attempt == RUN_ATTEMPTS or not isinstance(inner, NotMaster):
                        raise
                    log.info("processing: %s; again with the new masters", inner)
                    await asyncio.sleep(self.retry_s)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run_locked(self, mode: str) -> dict[str, Any]:
        started = time.monotonic()
        masters = await self.driver.masters()
        work = await self._seal(mode, masters)
        summary: dict[str, Any] = {
            "blocks": sum(len(w) for w in work.values()),
            "units": 0,
            "events": 0,
            "generation": self.catalog.generation(),
        }
        summary["seal_s"] = round(time.monotonic() - started, 3)
        if summary["blocks"]:
            units, phases = await self._process(work, masters)
            summary.update(phases)
            cursors = {g: max(b["seal_index"] for b in w) for g, w in work.items() if w}
            summary["generation"] = await asyncio.to_thread(
                self.catalog.publish, units, cursors, self.catalog.current_version()
            )
            await self._release(cursors)
            summary["units"] = len(units)
            self.republished_units += sum(1 for u in units if u.parts > 1)
            summary["events"] = sum(u.events for u in units)
            self.published += 1
        await self.update_watermark(masters)
        summary["seconds"] = round(time.monotonic() - started, 3)
        if summary["blocks"]:
            self.last_job = summary
        return summary

    async def _seal(self, mode: str, masters: dict[int, Any]) -> Work:
        """Ask every master to seal what ``mode`` says is due; the committed seals past
        each group's cursor."""
        timeout = self.settings.rpc_timeout_s + self.settings.commit_timeout_s
        await asyncio.wait_for(
            asyncio.gather(*(m.seal.remote(mode) for m in masters.values())), timeout
        )
        work: Work = {}
        for group, master in masters.items():
            work[group] = await asyncio.wait_for(
                master.sealed_blocks.remote(self.catalog.cursor(group)), timeout
            )
        return work

    async def _process(
        self, work: Work, masters: dict[int, Any]
    ) -> tuple[list[Unit], dict[str, float]]:
        """Map-reduce every (shard, hour) touched by ``work`` from all its sealed parts,
        with the current version's logic; the units, and the seconds of each phase."""
        current = self.catalog.version()
        targets: list[Target] = sorted(
            {(b["shard"], b["hour"]) for blocks in work.values() for b in blocks}
        )
        # Every group that ever owned a target's shard may hold parts of it: the new
        # sealed ones (up to this job's seals), or published ones (up to its cursor).
        needed = {g for groups in self.driver.owners_ever(targets).values() for g in groups}
        readers, upto = {}, {}
        for group in sorted(needed):
            blocks = work.get(group) or []
            upto[group] = (
                max(b["seal_index"] for b in blocks) if blocks else self.catalog.cursor(group)
            )
            readers[group] = await self.driver.reader(group, upto[group], masters[group])
        started = time.monotonic()
        units, map_outputs = await self.driver.map(
            targets, readers, upto, current.logic, current.modules, None
        )
        mapped = time.monotonic()
        written = await self.driver.reduce_write(current.logic, new_job_id(), units, map_outputs)
        phases = {
            "map_s": round(mapped - started, 3),
            "reduce_write_s": round(time.monotonic() - mapped, 3),
        }
        return sorted(written, key=lambda u: (u.hour, u.shard)), phases

    async def _release(self, cursors: dict[int, int]) -> None:
        """Now in the warehouse: not live any more, and every replica can forget where
        those entries lie (replica_log.release). Not waited for: a replica that misses
        it (being restarted) releases at the next publication."""
        reached = await asyncio.gather(
            *(
                self.directory.handle_async(group, r)
                for group in cursors
                for r in range(self.settings.replicas)
            ),
            return_exceptions=True,
        )
        to = [cursor for cursor in cursors.values() for _r in range(self.settings.replicas)]
        for handle, cursor in zip(reached, to, strict=True):
            if not isinstance(handle, BaseException):
                handle.published.remote(cursor)

    async def update_watermark(self, masters: dict[int, Any]) -> None:
        """Data is final up to the oldest hour that still has an open block."""
        timeout = self.settings.rpc_timeout_s
        statuses = await asyncio.wait_for(
            asyncio.gather(*(m.status.remote() for m in masters.values())), timeout
        )
        now_minute = self.clock_ms() // 60_000 * 60_000
        oldest = [st["oldest_open_hour"] for st in statuses if st["oldest_open_hour"] is not None]
        watermark = min([h * HOUR_MS for h in oldest] + [now_minute])
        await asyncio.to_thread(self.catalog.set_watermark, watermark)
