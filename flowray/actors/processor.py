"""The processor: seals due blocks, runs map-reduce over them, publishes the result.

One per cluster. Each cycle asks every group master to seal what is due, collects the
committed seals past the group's cursor in the catalog, re-processes every (shard,
hour) unit they touch from all of its sealed parts, and publishes the new unit files
and the moved cursors in one catalog transaction. A crash anywhere before that
transaction leaves the catalog as it was, and the next cycle redoes the work.

It also runs re-processing and rollback as jobs (see ``reprocess`` and ``rollback``):
a job re-reads the retained raw log up to the published cursors, hour by hour so that
its memory is bounded, writes new unit files beside the current ones, and switches
the catalog's current version in one transaction at the end. Jobs and regular cycles
take turns on one lock, so a job sees a version nobody publishes into meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flowray.actors import memtrim
from flowray.actors.directory import Directory, lookup_actor
from flowray.actors.names import gateway_name
from flowray.actors.replica import NotMaster
from flowray.config import Settings
from flowray.core import logic as logics
from flowray.core.router import ShardMap, normalize_site, reduce_key_for_shard, shard_for_site
from flowray.core.units import HOUR_MS
from flowray.tasks.mapreduce import (
    DIFF_SCHEMA,
    map_task,
    merge_task,
    reduce_rewrite_task,
    reduce_write_task,
)
from flowray.warehouse.catalog import Catalog, CatalogError, Unit

READER_TRIES = 5
# Runs of one processing cycle that found a master gone, and the pause between them
# (an election takes 0.5-1 s at the default timing).
RUN_ATTEMPTS = 3
RUN_RETRY_S = 1.0
JOBS_KEPT = 20  # finished jobs remembered for their results
DIFF_SITES_MAX = 10_000  # per-site diff rows a job reports (largest changes first)
SITES_MAX = 10_000  # sites one re-processing run may name
MAP_INFLIGHT_PER_CPU = 2  # map tasks (and their reads) in flight per CPU
COMPACT_PER_CYCLE = 8  # shard-days merged per processing cycle at most
Target = tuple[int, int]  # (shard, hour)
log = logging.getLogger("flowray.processor")


def _now_ms() -> int:
    return int(time.time() * 1000)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Processor:
    def __init__(self, settings_json: dict[str, Any]) -> None:
        self.settings = Settings.from_json(settings_json)
        self.directory = Directory(self.settings)
        self.catalog = Catalog(self.settings.warehouse_dir / "catalog.sqlite")
        # Jobs, cycles, compaction and moves take turns; made on first use, in the loop.
        self._lock_made: asyncio.Lock | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.jobs = 0
        self.republished_units = 0  # units published again because late events came
        self.merged_days = 0  # shard-days compacted into one file
        self.last_job: dict[str, Any] = {}
        self.last_error = ""
        # The map the layout starts with; moves (in the catalog) apply on top of it.
        self.base_map = self.settings.base_map()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._logic_modules: dict[str, tuple[str, ...]] = {}  # logic -> modules it needs

    @property
    def _lock(self) -> asyncio.Lock:
        if self._lock_made is None:
            self._lock_made = asyncio.Lock()
        return self._lock_made

    async def start(self) -> None:
        """Start the processing loop (also done by run and status, after a restart)."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.process_interval_s)
            try:
                await self.keep_gateway()
                await self.run("due")
                await self.compact()
                await asyncio.to_thread(memtrim.trim)  # what the cycle freed goes back
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
        """Seal what ``mode`` says is due, process every sealed block, publish. A run
        that met a replica no longer master (a failover since the masters were looked
        up) starts over with the new masters, up to RUN_ATTEMPTS times."""
        await self.start()
        async with self._lock:
            for attempt in range(1, RUN_ATTEMPTS + 1):
                try:
                    return await self._run_locked(mode)
                except Exception as exc:
                    for group in range(self.settings.groups):
                        self.directory.forget(group)  # a master may have moved: ask again
                    inner = getattr(exc, "cause", None) or exc
                    if attempt == RUN_ATTEMPTS or not isinstance(inner, NotMaster):
                        raise
                    log.info("processing: %s; again with the new masters", inner)
                    await asyncio.sleep(RUN_RETRY_S)
        raise AssertionError("unreachable")  # pragma: no cover

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
        summary["seal_s"] = round(time.monotonic() - started, 3)
        if summary["blocks"]:
            units, phases = await self._process(work, masters)
            summary.update(phases)
            cursors = {g: max(b["seal_index"] for b in w) for g, w in work.items() if w}
            summary["generation"] = await asyncio.to_thread(
                self.catalog.publish, units, cursors, self.catalog.current_version()
            )
            # Now in the warehouse: not live any more, and every replica can forget where
            # those entries lie (replica_log.release). Not waited for: a replica that
            # misses it (being restarted) releases at the next publication.
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
    ) -> tuple[list[Unit], dict[str, float]]:
        """Map-reduce every (shard, hour) touched by ``work`` from all its sealed parts,
        with the current version's logic; the units, and the seconds of each phase."""
        current = self.catalog.version()
        targets = sorted({(b["shard"], b["hour"]) for blocks in work.values() for b in blocks})
        # Every group that ever owned a target's shard may hold parts of it: the new
        # sealed ones (up to this job's seals), or published ones (up to its cursor).
        moves = self.catalog.shard_moves()
        needed = {
            g for shard, _h in targets for g in ShardMap.groups_ever(shard, self.base_map, moves)
        }
        readers, upto = {}, {}
        for group in sorted(needed):
            blocks = work.get(group) or []
            upto[group] = (
                max(b["seal_index"] for b in blocks) if blocks else self.catalog.cursor(group)
            )
            readers[group] = await self._reader(group, upto[group], masters[group])
        started = time.monotonic()
        units, map_outputs = await self._map(
            targets, readers, upto, current.logic, current.modules, None
        )
        mapped = time.monotonic()
        job = uuid.uuid4().hex[:12]
        root = str(self.settings.warehouse_dir)
        writes = [
            reduce_write_task.remote(root, current.logic, job, mine, *partials)
            for mine, partials in self._by_key(units, map_outputs)
        ]
        written = await asyncio.wait_for(asyncio.gather(*writes), self.settings.process_timeout_s)
        phases = {
            "map_s": round(mapped - started, 3),
            "reduce_write_s": round(time.monotonic() - mapped, 3),
        }
        made = sorted((u for w in written for u in w), key=lambda u: (u.hour, u.shard))
        return made, phases

    def _by_key(
        self, units: list[tuple[int, int, int]], map_outputs: list[list[Any]]
    ) -> list[tuple[list[tuple[int, int, int]], list[Any]]]:
        """(units owned, partial refs) of every reduce key that owns some unit."""
        keys = self.settings.reduce_keys
        out = []
        for k in range(keys):
            mine = [u for u in units if reduce_key_for_shard(u[0], keys) == k]
            if mine:
                out.append((mine, [m[k] for m in map_outputs]))
        return out

    async def _map(
        self,
        targets: list[Target],
        readers: dict[int, Any],
        upto: dict[int, int],
        logic: str,
        modules: tuple[str, ...],
        sites: list[str] | None,
    ) -> tuple[list[tuple[int, int, int]], list[list[Any]]]:
        """Map the sealed parts of ``targets`` (read from ``readers`` up to the seal
        index ``upto``, per group): the units with their part counts, and per map task
        the refs of its R partial tables, once every map task has finished.

        At most MAP_INFLIGHT_PER_CPU map tasks per CPU (and their reads) are in flight,
        so the raw payloads in memory stay bounded however big the hour is.
        """
        s = self.settings
        slices: list[Slice] = []
        # Every unit's parts first (from every group that ever owned its shard): once
        # reads start, the readers are busy serving them.
        moves = self.catalog.shard_moves()
        asks = [
            (g, (shard, hour))
            for shard, hour in targets
            for g in ShardMap.groups_ever(shard, self.base_map, moves)
        ]
        all_parts = await asyncio.wait_for(
            asyncio.gather(
                *(readers[g].block_parts.remote(shard, hour, upto[g]) for g, (shard, hour) in asks)
            ),
            s.rpc_timeout_s,
        )
        parts_of: dict[Target, int] = dict.fromkeys(targets, 0)
        for (group, (shard, hour)), parts in zip(asks, all_parts, strict=True):
            parts_of[(shard, hour)] += len(parts)
            for part, nbytes in parts:
                n = max(1, -(-nbytes // s.map_slice_bytes))
                block = (shard, hour, part)
                slices += [((shard, hour), group, block, i, n, nbytes // n) for i in range(n)]
        units = [(shard, hour, parts_of[(shard, hour)]) for shard, hour in targets]
        # Where each block's slices lie: asked of the readers, a few bytes per record.
        blocks = sorted({(g, block, n) for _u, g, block, _i, n, _b in slices})
        plans = await asyncio.wait_for(
            asyncio.gather(*(readers[g].block_slices.remote(block, n) for g, block, n in blocks)),
            s.rpc_timeout_s,
        )
        plan = {(g, block): p for (g, block, _n), p in zip(blocks, plans, strict=True)}
        keys = s.reduce_keys
        inflight = MAP_INFLIGHT_PER_CPU * max(1, s.num_cpus)
        map_outputs: list[list[Any]] = []
        running: list[Any] = []
        for pack in _pack(sorted(slices, key=lambda x: x[1]), s.map_slice_bytes):
            node = plan[(pack[0][1], pack[0][2])][0]
            reads = [
                (plan[(g, block)][1], plan[(g, block)][2][i]) for _u, g, block, i, _n, _b in pack
            ]
            out: Any = map_task.options(
                num_returns=keys,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote([unit for unit, *_rest in pack], logic, keys, modules, sites, reads)
            outs = [out] if keys == 1 else list(out)
            map_outputs.append(outs)
            running.append(outs[0])
            if len(running) >= inflight:
                await asyncio.wait_for(running.pop(0), s.process_timeout_s)
        await asyncio.wait_for(asyncio.gather(*running), s.process_timeout_s)
        return units, map_outputs

    async def _reader(self, group: int, upto: int, master: Any) -> Any:
        """A follower that has committed everything up to ``upto``, to spare the master
        the reads; followers learn a commit within a heartbeat, so wait that long for
        one, then fall back to the master."""
        found = await asyncio.gather(
            *(self.directory.handle_async(group, r) for r in range(self.settings.replicas)),
            return_exceptions=True,
        )
        # One being re-created by Ray (or not found in time) is no reader now.
        replicas = [h for h in found if not isinstance(h, BaseException)]
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

    async def keep_gateway(self) -> bool:
        """Start each ingest gateway's server if its actor came back from a crash
        without it (Ray restarts the actor, not what ``start`` began); True if one had to."""
        restarted = False
        timeout = self.settings.rpc_timeout_s
        for i in range(self.settings.gateways):
            try:
                gateway = await lookup_actor(gateway_name(i), self.settings.namespace, timeout)
            except ValueError:
                continue  # this cluster runs without gateways
            except TimeoutError:
                log.warning("ingest gateway %d: no answer from Ray's GCS in time", i)
                continue
            state: dict[str, Any] = await asyncio.wait_for(gateway.ping.remote(), timeout)
            if state["started"]:
                continue
            await asyncio.wait_for(gateway.start.remote(), timeout)
            log.warning("ingest gateway %d had restarted without its server: started it", i)
            restarted = True
        return restarted

    async def compact(self, limit: int = COMPACT_PER_CYCLE) -> int:
        """Merge up to ``limit`` shard-days of the current version that are final (wholly
        before the watermark) into one file each; returns how many were merged.

        A one-site query over a day then opens one file instead of 24. Publishing into a
        merged day later (late events) drops the merged file from the catalog in the
        same transaction, so the hours are read again until the day is merged anew.
        """
        await self.start()
        async with self._lock:
            version = self.catalog.version()
            watermark = self.catalog.watermark_ms()
            if watermark is None:
                return 0
            days = self.catalog.mergeable_days(version.version, watermark // HOUR_MS, limit)
            job = uuid.uuid4().hex[:12]
            root = str(self.settings.warehouse_dir)
            plans = [
                (shard, day, self.catalog.day_units(version.version, shard, day))
                for shard, day in days
            ]
            merged = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        merge_task.remote(
                            root, version.logic, shard, day, job, [u.path for u in units]
                        )
                        for shard, day, units in plans
                    )
                ),
                self.settings.process_timeout_s,
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

    # ---- re-processing and rollback jobs -----------------------------------------------
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
        if end_ms <= start_ms:
            raise ValueError("end must be after start")
        if sites is not None:
            if not sites:
                raise ValueError("name at least one site, or none to re-process every site")
            if len(sites) > SITES_MAX:
                raise ValueError(f"at most {SITES_MAX} sites per run, got {len(sites)}")
            sites = sorted({normalize_site(x) for x in sites})
        current = self.catalog.version()
        logic = logic or current.logic
        # Map tasks run in other processes, which import these before looking the logic
        # up: the modules named now, and every module that ever registered this logic
        # (in an earlier run or in a version made with it), so a run may omit them.
        recorded = [m for v in self.catalog.versions() if v.logic == logic for m in v.modules]
        mods = tuple(
            dict.fromkeys(
                [
                    *self.settings.logic_module_names,
                    *self._logic_modules.get(logic, ()),
                    *recorded,
                    *(modules or []),
                ]
            )
        )
        logics.get(logic, mods)  # unknown logic or unimportable module: refused now
        self._logic_modules[logic] = mods
        params = {
            "start_ms": start_ms,
            "end_ms": end_ms,
            "sites": sites,
            "logic": logic,
            "modules": list(mods),
            "dry_run": dry_run,
        }
        return self._start_job(
            "reprocess",
            params,
            lambda st: self._reprocess(st, start_ms, end_ms, sites, logic, mods, dry_run),
        )

    async def rollback(self, to_version: int | None = None) -> dict[str, Any]:
        """Start returning to ``to_version`` (default: the current version's parent)."""
        await self.start()
        current = self.catalog.version()
        target = current.parent if to_version is None else to_version
        if target is None:
            raise ValueError(f"version {current.version} has no previous version to return to")
        if target == current.version:
            raise ValueError(f"version {target} is already current")
        try:
            self.catalog.version(target)
        except CatalogError as exc:
            raise ValueError(str(exc)) from None
        return self._start_job("rollback", {"to": target}, lambda st: self._rollback(st, target))

    async def move_shard(self, shard: int, to_group: int) -> dict[str, Any]:
        """Send ``shard``'s new writes to ``to_group`` from now on (see Catalog.move_shard).

        Ingest processes pick the change up within a second; until then, and for late
        writes, the old group takes them, which processing reads as well.
        """
        await self.start()
        if not 0 <= shard < self.settings.shards:
            raise ValueError(f"no shard {shard} (shards are 0..{self.settings.shards - 1})")
        if not 0 <= to_group < self.settings.groups:
            raise ValueError(f"no group {to_group} (groups are 0..{self.settings.groups - 1})")
        async with self._lock:  # not in the middle of a job that read the old map
            now = self.base_map.with_moves(self.catalog.shard_moves())
            from_group = now.group_of_shard(shard)
            if from_group == to_group:
                raise ValueError(f"shard {shard} is in group {to_group} already")
            await asyncio.to_thread(self.catalog.move_shard, shard, from_group, to_group)
        owners = now.with_moves([(shard, from_group, to_group)]).to_json()
        return {"shard": shard, "from_group": from_group, "to_group": to_group, "owners": owners}

    async def job(self, job_id: str) -> dict[str, Any] | None:
        state = self._jobs.get(job_id)
        return None if state is None else dict(state)

    async def versions(self) -> list[dict[str, Any]]:
        return [v.to_json() for v in await asyncio.to_thread(self.catalog.versions)]

    def _start_job(
        self,
        kind: str,
        params: dict[str, Any],
        work: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        job_id = uuid.uuid4().hex[:12]
        state: dict[str, Any] = {
            "job": job_id,
            "kind": kind,
            "params": params,
            "state": "running",
            "done": 0,
            "total": None,
            "started_ms": _now_ms(),
            "result": None,
            "error": None,
        }
        finished = [j for j, st in self._jobs.items() if st["state"] != "running"]
        for old in finished[: max(0, len(finished) - JOBS_KEPT + 1)]:
            del self._jobs[old]
        self._jobs[job_id] = state
        task = asyncio.create_task(self._run_job(state, work))
        self._job_tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._job_tasks.discard)
        return dict(state)

    async def _run_job(
        self,
        state: dict[str, Any],
        work: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> None:
        try:
            async with self._lock:
                state["result"] = await work(state)
            state["state"] = "done"
        except Exception as exc:  # reported to whoever polls the job
            state["error"] = f"{type(exc).__name__}: {exc}"
            state["state"] = "failed"
            log.warning("%s job %s failed: %s", state["kind"], state["job"], state["error"])
            for group in range(self.settings.groups):
                self.directory.forget(group)
        finally:
            state["seconds"] = round((_now_ms() - state["started_ms"]) / 1000, 3)

    async def _published_readers(self) -> tuple[dict[int, Any], dict[int, int]]:
        """A reader per group, caught up to the group's published cursor."""
        masters = await self._masters()
        upto = {g: self.catalog.cursor(g) for g in range(self.settings.groups)}
        readers = {g: await self._reader(g, upto[g], masters[g]) for g in masters}
        return readers, upto

    async def _rewrite_hours(
        self,
        state_targets: list[Target],
        logic: str,
        modules: tuple[str, ...],
        sites: list[str] | None,
        dry_run: bool,
        old: dict[Target, Unit],
        progress: dict[str, Any],
    ) -> tuple[list[Unit], pa.Table]:
        """Re-make ``state_targets`` hour by hour; new units and the diff per site."""
        readers, upto = await self._published_readers()
        job = uuid.uuid4().hex[:12]
        by_hour: dict[int, list[Target]] = {}
        for shard, hour in state_targets:
            by_hour.setdefault(hour, []).append((shard, hour))
        progress["total"] = len(state_targets)
        new_units: list[Unit] = []
        diffs: list[pa.Table] = []
        for hour in sorted(by_hour):
            targets = sorted(by_hour[hour])
            units, map_outputs = await self._map(targets, readers, upto, logic, modules, sites)
            old_paths = {t: old[t].path for t in targets if t in old}
            root = str(self.settings.warehouse_dir)
            rewrites = [
                reduce_rewrite_task.remote(
                    root, logic, job, mine, old_paths, sites, dry_run, *partials
                )
                for mine, partials in self._by_key(units, map_outputs)
            ]
            results = await asyncio.wait_for(
                asyncio.gather(*rewrites), self.settings.process_timeout_s
            )
            written = [u for made, _d in results for u in made]
            diffs += [d for _m, d in results]
            new_units += written
            progress["done"] += len(targets)
        return new_units, _sum_diffs(diffs)

    async def _reprocess(
        self,
        state: dict[str, Any],
        start_ms: int,
        end_ms: int,
        sites: list[str] | None,
        logic: str,
        modules: tuple[str, ...],
        dry_run: bool,
    ) -> dict[str, Any]:
        current = self.catalog.version()
        old = self.catalog.unit_map(current.version)
        hour_lo, hour_hi = start_ms // HOUR_MS, -(-end_ms // HOUR_MS)
        shards = None if sites is None else {shard_for_site(x, self.settings.shards) for x in sites}
        targets = sorted(
            t for t in old if hour_lo <= t[1] < hour_hi and (shards is None or t[0] in shards)
        )
        new_units, diff = await self._rewrite_hours(
            targets, logic, modules, sites, dry_run, old, state
        )
        result: dict[str, Any] = {
            "from_version": current.version,
            "logic": logic,
            "hours": [hour_lo * HOUR_MS, hour_hi * HOUR_MS],
            "units": len(new_units),
            "dry_run": dry_run,
            **_diff_report(diff),
        }
        if dry_run:
            result["version"] = None
            return result
        note = f"reprocess {logic} hours {hour_lo}..{hour_hi}" + (
            f" sites {len(sites)}" if sites else ""
        )
        version, generation = await asyncio.to_thread(
            self.catalog.create_version, current.version, logic, modules, new_units, note
        )
        result["version"] = version
        result["generation"] = generation
        return result

    async def _rollback(self, state: dict[str, Any], target: int) -> dict[str, Any]:
        """Make ``target`` current again, first re-making with its logic every unit the
        current version published after leaving it (new hours, late parts)."""
        current = self.catalog.version()
        goal = self.catalog.version(target)
        mine = self.catalog.unit_map(current.version)
        theirs = self.catalog.unit_map(target)
        stale = sorted(t for t, u in mine.items() if t not in theirs or theirs[t].parts < u.parts)
        new_units, _diff = await self._rewrite_hours(
            stale, goal.logic, goal.modules, None, False, theirs, state
        )
        generation = await asyncio.to_thread(
            self.catalog.switch, current.version, target, new_units
        )
        return {
            "from_version": current.version,
            "version": target,
            "logic": goal.logic,
            "units_brought_up_to_date": len(new_units),
            "generation": generation,
        }

    async def status(self) -> dict[str, Any]:
        await self.start()
        return {
            "pid": os.getpid(),
            "jobs": self.jobs,
            "republished_units": self.republished_units,
            "merged_days": self.merged_days,
            "last_job": self.last_job,
            "last_error": self.last_error,
            "catalog": self.catalog.summary(),
            "cursors": {g: self.catalog.cursor(g) for g in range(self.settings.groups)},
            "versions": [v.to_json() for v in self.catalog.versions()],
            "shard_owners": self.base_map.with_moves(self.catalog.shard_moves()).to_json(),
            "jobs_running": [dict(st) for st in self._jobs.values() if st["state"] == "running"],
        }

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task


Slice = tuple[Target, int, tuple[int, int, int], int, int, int]  # unit, group, block,
# slice number, slices, bytes


def _pack(slices: list[Slice], bytes_max: int) -> list[list[Slice]]:
    """Group small slices into map tasks of about ``bytes_max`` input bytes each."""
    packs: list[list[Slice]] = []
    current: list[Slice] = []
    size = 0
    for item in slices:
        # A pack reads one group's files: its map task runs on that reader's node.
        if current and (size + item[-1] > bytes_max or item[1] != current[0][1]):
            packs.append(current)
            current, size = [], 0
        current.append(item)
        size += item[-1]
    if current:
        packs.append(current)
    return packs


def _sum_diffs(diffs: list[pa.Table]) -> pa.Table:
    """Per-site totals of several units' diffs."""
    table = pa.concat_tables(diffs) if diffs else DIFF_SCHEMA.empty_table()
    if table.num_rows == 0:
        return table
    return (
        table.group_by("site")
        .aggregate([("buckets_changed", "sum"), ("before", "sum"), ("after", "sum")])
        .rename_columns(["site", "buckets_changed", "before", "after"])
    )


def _diff_report(diff: pa.Table) -> dict[str, Any]:
    """The sites that changed, largest change first (at most DIFF_SITES_MAX), and totals."""
    every = diff.to_pylist()
    rows = [r for r in every if r["buckets_changed"] or r["before"] != r["after"]]
    rows.sort(key=lambda r: (-abs(r["after"] - r["before"]), -r["buckets_changed"], r["site"]))
    return {
        "sites_examined": diff.num_rows,
        "sites_changed": len(rows),
        "buckets_changed": sum(r["buckets_changed"] for r in rows),
        "events_before": sum(r["before"] for r in every),
        "events_after": sum(r["after"] for r in every),
        "changes": rows[:DIFF_SITES_MAX],
        "changes_truncated": len(rows) > DIFF_SITES_MAX,
    }
