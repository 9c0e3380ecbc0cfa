"""The processor: seals due blocks, runs map-reduce over them, publishes the result.

One per cluster. Each cycle asks every group master to seal what is due, collects the
committed seals past the group's cursor in the catalog, re-processes every (shard,
hour) unit they touch from all of its sealed parts, and publishes the new unit files
and the moved cursors in one catalog transaction. A crash anywhere before that
transaction leaves the catalog as it was, and the next cycle redoes the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import ray

from flowray.actors.directory import Directory
from flowray.config import Settings
from flowray.storage.catalog import Catalog, Unit
from flowray.tasks.mapreduce import map_task, reduce_task, write_task

HOUR_MS = 3_600_000
READER_TRIES = 5
log = logging.getLogger("flowray.processor")


def _now_ms() -> int:
    return int(time.time() * 1000)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Processor:
    def __init__(self, settings_json: dict[str, Any]) -> None:
        self.settings = Settings.from_json(settings_json)
        self.directory = Directory(self.settings)
        self.catalog = Catalog(self.settings.warehouse_dir / "catalog.sqlite")
        self._lock: asyncio.Lock | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.jobs = 0
        self.republished_units = 0  # units published again because late events came
        self.last_job: dict[str, Any] = {}
        self.last_error = ""

    async def start(self) -> None:
        """Start the processing loop (also done by run and status, after a restart)."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.process_interval_s)
            try:
                await self.run("due")
            except Exception as exc:  # an operating error: report, retry next cycle
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("processing cycle failed: %s", self.last_error)

    async def _masters(self) -> dict[int, Any]:
        out = {}
        for group in range(self.settings.groups):
            _replica, handle = await self.directory.master(group)
            out[group] = handle
        return out

    async def run(self, mode: str = "due") -> dict[str, Any]:
        """Seal what ``mode`` says is due, process every sealed block, publish."""
        await self.start()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                return await self._run_locked(mode)
            except Exception:
                for group in range(self.settings.groups):
                    self.directory.forget(group)  # a master may have moved: ask again
                raise

    async def _run_locked(self, mode: str) -> dict[str, Any]:
        timeout = self.settings.rpc_timeout_s + self.settings.commit_timeout_s
        started = time.monotonic()
        masters = await self._masters()
        await asyncio.wait_for(
            asyncio.gather(*(m.seal.remote(mode) for m in masters.values())), timeout
        )
        work: dict[int, list[dict[str, int]]] = {}
        for group, master in masters.items():
            work[group] = await asyncio.wait_for(
                master.sealed_blocks.remote(self.catalog.cursor(group)), timeout
            )
        summary: dict[str, Any] = {
            "blocks": sum(len(w) for w in work.values()),
            "units": 0,
            "events": 0,
            "generation": self.catalog.generation(),
        }
        if summary["blocks"]:
            units = await self._process(work, masters)
            cursors = {g: max(b["seal_index"] for b in w) for g, w in work.items() if w}
            summary["generation"] = await asyncio.to_thread(self.catalog.publish, units, cursors)
            for group, cursor in cursors.items():  # now in the warehouse: not live any more
                masters[group].published.remote(cursor)
            summary["units"] = len(units)
            self.republished_units += sum(1 for u in units if u.parts > 1)
            summary["events"] = sum(u.events for u in units)
            self.jobs += 1
        await self._update_watermark(masters)
        summary["seconds"] = round(time.monotonic() - started, 3)
        if summary["blocks"]:
            self.last_job = summary
        return summary

    async def _process(
        self, work: dict[int, list[dict[str, int]]], masters: dict[int, Any]
    ) -> list[Unit]:
        """Map-reduce every (shard, hour) touched by ``work`` from all its sealed parts."""
        s = self.settings
        slices: list[tuple[tuple[int, int], Any, int]] = []  # (unit, payload ref, bytes)
        units: list[tuple[int, int, int]] = []
        timeout = s.rpc_timeout_s
        for group, blocks in work.items():
            upto = max(b["seal_index"] for b in blocks)
            reader = await self._reader(group, upto, masters[group])
            for shard, hour in sorted({(b["shard"], b["hour"]) for b in blocks}):
                parts = await asyncio.wait_for(
                    reader.block_parts.remote(shard, hour, upto), timeout
                )
                units.append((shard, hour, len(parts)))
                for part, nbytes in parts:
                    n = max(1, -(-nbytes // s.map_slice_bytes))
                    for i in range(n):
                        ref = reader.read_block.remote((shard, hour, part), i, n)
                        slices.append(((shard, hour), ref, nbytes // n))
        keys = s.reduce_keys
        map_outputs = [
            map_task.options(num_returns=keys).remote(
                [unit for unit, _r, _b in pack], "default", keys, *[r for _u, r, _b in pack]
            )
            for pack in _pack(slices, s.map_slice_bytes)
        ]
        if keys == 1:
            map_outputs = [[m] for m in map_outputs]
        reduced = [reduce_task.remote(*[out[k] for out in map_outputs]) for k in range(keys)]
        job = uuid.uuid4().hex[:12]
        written: list[Unit] = await asyncio.wait_for(
            write_task.remote(str(s.warehouse_dir), "default", job, units, *reduced),
            s.process_timeout_s,
        )
        return written

    async def _reader(self, group: int, upto: int, master: Any) -> Any:
        """A follower that has committed everything up to ``upto``, to spare the master
        the reads; followers learn a commit within a heartbeat, so wait that long for
        one, then fall back to the master."""
        replicas = [self.directory.handle(group, r) for r in range(self.settings.replicas)]
        for _attempt in range(READER_TRIES):
            statuses = await asyncio.gather(
                *(
                    asyncio.wait_for(h.status.remote(), self.settings.rpc_timeout_s)
                    for h in replicas
                ),
                return_exceptions=True,
            )
            for handle, st in zip(replicas, statuses, strict=True):
                if isinstance(st, dict) and st["role"] == "follower" and st["commit_index"] >= upto:
                    return handle
            await asyncio.sleep(self.settings.tick_s * self.settings.heartbeat_ticks)
        return master

    async def _update_watermark(self, masters: dict[int, Any]) -> None:
        """Data is final up to the oldest hour that still has an open block."""
        timeout = self.settings.rpc_timeout_s
        statuses = await asyncio.wait_for(
            asyncio.gather(*(m.status.remote() for m in masters.values())), timeout
        )
        now_minute = _now_ms() // 60_000 * 60_000
        oldest = [st["oldest_open_hour"] for st in statuses if st["oldest_open_hour"] is not None]
        watermark = min([h * HOUR_MS for h in oldest] + [now_minute])
        await asyncio.to_thread(self.catalog.set_watermark, watermark)

    async def status(self) -> dict[str, Any]:
        await self.start()
        return {
            "jobs": self.jobs,
            "republished_units": self.republished_units,
            "last_job": self.last_job,
            "last_error": self.last_error,
            "catalog": self.catalog.summary(),
            "cursors": {g: self.catalog.cursor(g) for g in range(self.settings.groups)},
        }

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task


def _pack(
    slices: list[tuple[tuple[int, int], Any, int]], bytes_max: int
) -> list[list[tuple[tuple[int, int], Any, int]]]:
    """Group small slices into map tasks of about ``bytes_max`` input bytes each."""
    packs: list[list[tuple[tuple[int, int], Any, int]]] = []
    current: list[tuple[tuple[int, int], Any, int]] = []
    size = 0
    for item in slices:
        if current and size + item[2] > bytes_max:
            packs.append(current)
            current, size = [], 0
        current.append(item)
        size += item[2]
    if current:
        packs.append(current)
    return packs
