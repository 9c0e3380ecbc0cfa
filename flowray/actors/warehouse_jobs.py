"""Re-processing, rollback and shard moves: the changes an operator asks of the warehouse.

Re-processing and rollback run as jobs (see flowray.actors.jobs): a job re-reads the
retained raw log up to the published cursors, hour by hour so that its memory is
bounded, writes new unit files beside the current ones, and switches the catalog's
current version in one transaction at the end. A request is checked before its job
starts, so a bad one is refused at once rather than reported as a failed job.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa

from flowray.actors.jobs import JobRunner
from flowray.actors.mapreduce_driver import MapReduceDriver, Target, new_job_id
from flowray.config import Settings
from flowray.core import logic as logics
from flowray.core.router import normalize_site, shard_for_site
from flowray.core.units import HOUR_MS
from flowray.tasks.mapreduce import DIFF_SCHEMA
from flowray.warehouse.catalog import Catalog, CatalogError, Unit

DIFF_SITES_MAX = 10_000  # per-site diff rows a job reports (largest changes first)
SITES_MAX = 10_000  # sites one re-processing run may name


class WarehouseJobs:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        driver: MapReduceDriver,
        runner: JobRunner,
        lock: asyncio.Lock,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.driver = driver
        self.runner = runner
        self.lock = lock  # jobs, cycles, compaction and moves take turns
        self.base_map = settings.base_map()
        self._logic_modules: dict[str, tuple[str, ...]] = {}  # logic -> modules it needs

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
        progress and the result come from the job runner.
        """
        if end_ms <= start_ms:
            raise ValueError("end must be after start")
        if sites is not None:
            if not sites:
                raise ValueError("name at least one site, or none to re-process every site")
            if len(sites) > SITES_MAX:
                raise ValueError(f"at most {SITES_MAX} sites per run, got {len(sites)}")
            sites = sorted({normalize_site(x) for x in sites})
        logic = logic or self.catalog.version().logic
        mods = self._modules_for(logic, modules)
        params = {
            "start_ms": start_ms,
            "end_ms": end_ms,
            "sites": sites,
            "logic": logic,
            "modules": list(mods),
            "dry_run": dry_run,
        }
        return self.runner.start(
            "reprocess",
            params,
            lambda st: self._reprocess(st, start_ms, end_ms, sites, logic, mods, dry_run),
        )

    def _modules_for(self, logic: str, modules: list[str] | None) -> tuple[str, ...]:
        """The modules map tasks import before looking ``logic`` up: those named now, and
        every module that ever registered it (in an earlier run or in a version made
        with it), so a run may omit them. Refuses an unknown logic or module now."""
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
        logics.get(logic, mods)
        self._logic_modules[logic] = mods
        return mods

    async def rollback(self, to_version: int | None = None) -> dict[str, Any]:
        """Start returning to ``to_version`` (default: the current version's parent)."""
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
        return self.runner.start("rollback", {"to": target}, lambda st: self._rollback(st, target))

    async def move_shard(self, shard: int, to_group: int) -> dict[str, Any]:
        """Send ``shard``'s new writes to ``to_group`` from now on (see Catalog.move_shard).

        Ingest processes pick the change up within a second; until then, and for late
        writes, the old group takes them, which processing reads as well.
        """
        if not 0 <= shard < self.settings.shards:
            raise ValueError(f"no shard {shard} (shards are 0..{self.settings.shards - 1})")
        if not 0 <= to_group < self.settings.groups:
            raise ValueError(f"no group {to_group} (groups are 0..{self.settings.groups - 1})")
        async with self.lock:  # not in the middle of a job that read the old map
            now = self.base_map.with_moves(self.catalog.shard_moves())
            from_group = now.group_of_shard(shard)
            if from_group == to_group:
                raise ValueError(f"shard {shard} is in group {to_group} already")
            await asyncio.to_thread(self.catalog.move_shard, shard, from_group, to_group)
        owners = now.with_moves([(shard, from_group, to_group)]).to_json()
        return {"shard": shard, "from_group": from_group, "to_group": to_group, "owners": owners}

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
        readers, upto = await self.driver.published_readers()
        job = new_job_id()
        by_hour: dict[int, list[Target]] = {}
        for shard, hour in state_targets:
            by_hour.setdefault(hour, []).append((shard, hour))
        progress["total"] = len(state_targets)
        new_units: list[Unit] = []
        diffs: list[pa.Table] = []
        for hour in sorted(by_hour):
            targets = sorted(by_hour[hour])
            units, map_outputs = await self.driver.map(
                targets, readers, upto, logic, modules, sites
            )
            old_paths = {t: old[t].path for t in targets if t in old}
            results = await self.driver.reduce_rewrite(
                logic, job, units, map_outputs, old_paths, sites, dry_run
            )
            new_units += [u for made, _d in results for u in made]
            diffs += [d for _m, d in results]
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


def _sum_diffs(diffs: list[pa.Table]) -> pa.Table:
    """Per-site totals of several units' diffs."""
    table = pa.concat_tables(diffs) if diffs else DIFF_SCHEMA.empty_table()
    if table.num_rows == 0:
        return table
    summed = [name for name in DIFF_SCHEMA.names if name != "site"]
    return (
        table.group_by("site")
        .aggregate([(name, "sum") for name in summed])
        .rename_columns(["site", *summed])
    )


def _diff_report(diff: pa.Table) -> dict[str, Any]:
    """The sites that changed, largest change first (at most DIFF_SITES_MAX), and totals."""
    every = diff.to_pylist()
    rows = [
        r
        for r in every
        if r["buckets_changed"]
        or r["before"] != r["after"]
        or r["visitors_before"] != r["visitors_after"]
    ]
    rows.sort(key=lambda r: (-abs(r["after"] - r["before"]), -r["buckets_changed"], r["site"]))
    return {
        "sites_examined": diff.num_rows,
        "sites_changed": len(rows),
        "buckets_changed": sum(r["buckets_changed"] for r in rows),
        "events_before": sum(r["before"] for r in every),
        "events_after": sum(r["after"] for r in every),
        "custom_events_before": sum(r["custom_before"] for r in every),
        "custom_events_after": sum(r["custom_after"] for r in every),
        "changes": rows[:DIFF_SITES_MAX],
        "changes_truncated": len(rows) > DIFF_SITES_MAX,
    }
