"""Drives the map and reduce Ray tasks over sealed blocks.

The processing cycle, the re-processing jobs and compaction all read sealed parts from
a replica and run the tasks of flowray.tasks.mapreduce over them; this is the one place
that picks the replica to read from, plans the slices, bounds the map tasks in flight
and gathers the reduce results, so the three callers hold only their own decisions and
can be tested with a stand-in for it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pyarrow as pa
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flowray.actors.directory import Directory
from flowray.config import Settings
from flowray.core.router import ShardMap, reduce_key_for_shard
from flowray.tasks.mapreduce import map_task, merge_task, reduce_rewrite_task, reduce_write_task
from flowray.warehouse.catalog import Catalog, Unit

READER_TRIES = 5
MAP_INFLIGHT_PER_CPU = 2  # map tasks (and their reads) in flight per CPU
Target = tuple[int, int]  # (shard, hour)
MapUnit = tuple[int, int, int]  # (shard, hour, parts)
Slice = tuple[Target, int, tuple[int, int, int], int, int, int]  # unit, group, block,
# slice number, slices, bytes


def new_job_id() -> str:
    """Names one run's output files, so that two runs never write the same file."""
    return uuid.uuid4().hex[:12]


class MapReduceDriver:
    def __init__(self, settings: Settings, directory: Directory, catalog: Catalog) -> None:
        self.settings = settings
        self.directory = directory
        self.catalog = catalog
        # The map the layout starts with; moves (in the catalog) apply on top of it.
        self.base_map = settings.base_map()

    def forget_masters(self) -> None:
        """After a failure a master may have moved: the next lookup asks again."""
        for group in range(self.settings.groups):
            self.directory.forget(group)

    async def masters(self) -> dict[int, Any]:
        out = {}
        for group in range(self.settings.groups):
            _replica, handle = await self.directory.master(group)
            out[group] = handle
        return out

    def owners_ever(self, targets: list[Target]) -> dict[Target, list[int]]:
        """Every group that ever owned each target's shard, and so may hold parts of it."""
        moves = self.catalog.shard_moves()
        return {t: ShardMap.groups_ever(t[0], self.base_map, moves) for t in targets}

    async def reader(self, group: int, upto: int, master: Any) -> Any:
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

    async def published_readers(self) -> tuple[dict[int, Any], dict[int, int]]:
        """A reader per group, caught up to the group's published cursor."""
        masters = await self.masters()
        upto = {g: self.catalog.cursor(g) for g in range(self.settings.groups)}
        readers = {g: await self.reader(g, upto[g], masters[g]) for g in masters}
        return readers, upto

    async def map(
        self,
        targets: list[Target],
        readers: dict[int, Any],
        upto: dict[int, int],
        logic: str,
        modules: tuple[str, ...],
        sites: list[str] | None,
    ) -> tuple[list[MapUnit], list[list[Any]]]:
        """Map the sealed parts of ``targets`` (read from ``readers`` up to the seal
        index ``upto``, per group): the units with their part counts, and per map task
        the refs of its R partial tables, once every map task has finished."""
        units, slices = await self._slices(targets, readers, upto)
        # Where each block's slices lie: asked of the readers, a few bytes per record.
        blocks = sorted({(g, block, n) for _u, g, block, _i, n, _b in slices})
        plans = await asyncio.wait_for(
            asyncio.gather(*(readers[g].block_slices.remote(block, n) for g, block, n in blocks)),
            self.settings.rpc_timeout_s,
        )
        plan = {(g, block): p for (g, block, _n), p in zip(blocks, plans, strict=True)}
        return units, await self._run_maps(slices, plan, logic, modules, sites)

    async def _slices(
        self, targets: list[Target], readers: dict[int, Any], upto: dict[int, int]
    ) -> tuple[list[MapUnit], list[Slice]]:
        """The units with their part counts, and the slices (about map_slice_bytes
        each) of every part, asked of the readers before any read keeps them busy."""
        s = self.settings
        owners = self.owners_ever(targets)
        asks = [(g, target) for target in targets for g in owners[target]]
        all_parts = await asyncio.wait_for(
            asyncio.gather(
                *(readers[g].block_parts.remote(shard, hour, upto[g]) for g, (shard, hour) in asks)
            ),
            s.rpc_timeout_s,
        )
        slices: list[Slice] = []
        parts_of: dict[Target, int] = dict.fromkeys(targets, 0)
        for (group, (shard, hour)), parts in zip(asks, all_parts, strict=True):
            parts_of[(shard, hour)] += len(parts)
            for part, nbytes in parts:
                n = max(1, -(-nbytes // s.map_slice_bytes))
                block = (shard, hour, part)
                slices += [((shard, hour), group, block, i, n, nbytes // n) for i in range(n)]
        units = [(shard, hour, parts_of[(shard, hour)]) for shard, hour in targets]
        return units, slices

    async def _run_maps(
        self,
        slices: list[Slice],
        plan: dict[tuple[int, tuple[int, int, int]], Any],
        logic: str,
        modules: tuple[str, ...],
        sites: list[str] | None,
    ) -> list[list[Any]]:
        """Run the map tasks, each on its reader's node. At most MAP_INFLIGHT_PER_CPU
        per CPU (and their reads) are in flight, so the raw payloads in memory stay
        bounded however big the hour is."""
        s = self.settings
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
        return map_outputs

    def by_key(
        self, units: list[MapUnit], map_outputs: list[list[Any]]
    ) -> list[tuple[list[MapUnit], list[Any]]]:
        """(units owned, partial refs) of every reduce key that owns some unit."""
        keys = self.settings.reduce_keys
        out = []
        for k in range(keys):
            mine = [u for u in units if reduce_key_for_shard(u[0], keys) == k]
            if mine:
                out.append((mine, [m[k] for m in map_outputs]))
        return out

    async def reduce_write(
        self, logic: str, job: str, units: list[MapUnit], map_outputs: list[list[Any]]
    ) -> list[Unit]:
        """Reduce every key's partials and write its units' files; the units made."""
        root = str(self.settings.warehouse_dir)
        writes = [
            reduce_write_task.remote(root, logic, job, mine, *partials)
            for mine, partials in self.by_key(units, map_outputs)
        ]
        written = await asyncio.wait_for(asyncio.gather(*writes), self.settings.process_timeout_s)
        return [u for w in written for u in w]

    async def reduce_rewrite(
        self,
        logic: str,
        job: str,
        units: list[MapUnit],
        map_outputs: list[list[Any]],
        old_paths: dict[Target, str],
        sites: list[str] | None,
        dry_run: bool,
    ) -> list[tuple[list[Unit], pa.Table]]:
        """Reduce every key's partials into new files beside ``old_paths``; per key, the
        units made and the per-site diff against the old files."""
        root = str(self.settings.warehouse_dir)
        rewrites = [
            reduce_rewrite_task.remote(root, logic, job, mine, old_paths, sites, dry_run, *partials)
            for mine, partials in self.by_key(units, map_outputs)
        ]
        results: list[tuple[list[Unit], pa.Table]] = await asyncio.wait_for(
            asyncio.gather(*rewrites), self.settings.process_timeout_s
        )
        return results

    async def merge(
        self, logic: str, job: str, days: list[tuple[int, int, list[str]]]
    ) -> list[Unit]:
        """Merge each (shard, day, unit paths) into one file; the merged units, in order."""
        root = str(self.settings.warehouse_dir)
        merged: list[Unit] = await asyncio.wait_for(
            asyncio.gather(
                *(
                    merge_task.remote(root, logic, shard, day, job, paths)
                    for shard, day, paths in days
                )
            ),
            self.settings.process_timeout_s,
        )
        return merged


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
