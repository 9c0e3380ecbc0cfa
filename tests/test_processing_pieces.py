"""The processor's pieces, each alone, with stand-ins for the replicas, the gateways and
the Ray tasks, and a real catalog (no Ray cluster): the cycle, compaction, the job
runner, the warehouse jobs, and the schedule with gateway supervision."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from flowray.actors.compaction import Compactor
from flowray.actors.jobs import JOBS_KEPT, JobRunner
from flowray.actors.mapreduce_driver import MapReduceDriver, MapUnit, Target
from flowray.actors.names import gateway_name
from flowray.actors.processing_cycle import RUN_ATTEMPTS, ProcessingCycle
from flowray.actors.supervision import GatewaySupervisor, Schedule
from flowray.actors.warehouse_jobs import SITES_MAX, WarehouseJobs
from flowray.config import Settings
from flowray.core.replication import NotMaster
from flowray.core.router import shard_for_site
from flowray.core.units import DAY_HOURS, HOUR_MS
from flowray.tasks.mapreduce import DIFF_SCHEMA
from flowray.warehouse.catalog import Catalog, Unit

# The diff's columns for custom events and visitors, which these fake units leave alone.
NO_OTHER_CHANGE = dict.fromkeys(
    ("custom_before", "custom_after", "visitors_before", "visitors_after"), 0
)
NOW_MS = 1_700_000_123_456  # the stand-in clock's time


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Method:
    """A Ray actor method's stand-in: ``.remote(...)`` gives what ``call`` returns."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.call(*args)


class FakeReplica:
    """One replica: as master it seals and lists sealed blocks; any replica is told
    what was published."""

    def __init__(self, blocks: list[dict[str, int]], oldest_open_hour: int | None) -> None:
        self.blocks = blocks
        self.oldest_open_hour = oldest_open_hour
        self.seal_errors: list[Exception] = []  # raised by the next seals, in order
        self.seal = Method(self._seal)
        self.sealed_blocks = Method(self._sealed_blocks)
        self.status = Method(self._status)
        self.published = Method(lambda cursor: None)  # not waited for, as with Ray

    async def _seal(self, mode: str) -> list[Any]:
        if self.seal_errors:
            raise self.seal_errors.pop(0)
        return []

    async def _sealed_blocks(self, after: int) -> list[dict[str, int]]:
        return [b for b in self.blocks if b["seal_index"] > after]

    async def _status(self) -> dict[str, Any]:
        return {"role": "master", "oldest_open_hour": self.oldest_open_hour}


class FakeDirectory:
    """Replica 0 of every group is its master."""

    def __init__(self, replicas: dict[int, list[FakeReplica]]) -> None:
        self.replicas = replicas
        self.forgotten: list[int] = []

    async def master(self, group: int) -> tuple[int, Any]:
        return 0, self.replicas[group][0]

    async def handle_async(self, group: int, replica: int) -> Any:
        return self.replicas[group][replica]

    def forget(self, group: int, hint: int | None = None) -> None:
        self.forgotten.append(group)


class FakeDriver(MapReduceDriver):
    """The real driver's bookkeeping (masters, owners, keys) with the Ray tasks replaced:
    every unit comes out with 10 events, and its parts as ``parts`` says (default 1)."""

    def __init__(self, settings: Settings, directory: Any, catalog: Catalog) -> None:
        super().__init__(settings, directory, catalog)
        self.parts: dict[Target, int] = {}
        self.maps: list[dict[str, Any]] = []
        self.merges: list[list[tuple[int, int, list[str]]]] = []
        self.diffs: dict[Target, tuple[int, int]] = {}  # (before, after) of one site

    async def reader(self, group: int, upto: int, master: Any) -> Any:
        return master

    async def map(
        self,
        targets: list[Target],
        readers: dict[int, Any],
        upto: dict[int, int],
        logic: str,
        modules: tuple[str, ...],
        sites: list[str] | None,
    ) -> tuple[list[MapUnit], list[list[Any]]]:
        self.maps.append(
            {"targets": targets, "readers": sorted(readers), "upto": dict(upto), "logic": logic}
        )
        units = [(s, h, self.parts.get((s, h), 1)) for s, h in targets]
        return units, [[f"partial{k}" for k in range(self.settings.reduce_keys)]]

    def _unit(self, job: str, unit: MapUnit) -> Unit:
        shard, hour, parts = unit
        return Unit(shard, hour, f"{job}/{shard}-{hour}.parquet", parts, 1, 10)

    async def reduce_write(
        self, logic: str, job: str, units: list[MapUnit], map_outputs: list[list[Any]]
    ) -> list[Unit]:
        return [self._unit(job, u) for mine, _p in self.by_key(units, map_outputs) for u in mine]

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
        out = []
        for mine, _partials in self.by_key(units, map_outputs):
            rows = [
                {
                    "site": f"s{s}.com",
                    "buckets_changed": int(b != a),
                    "before": b,
                    "after": a,
                    **NO_OTHER_CHANGE,
                }
                for s, h, _n in mine
                for b, a in [self.diffs.get((s, h), (10, 10))]
            ]
            out.append(
                ([self._unit(job, u) for u in mine], pa.Table.from_pylist(rows, DIFF_SCHEMA))
            )
        return out

    async def merge(
        self, logic: str, job: str, days: list[tuple[int, int, list[str]]]
    ) -> list[Unit]:
        self.merges.append(days)
        return [
            Unit(shard, day * DAY_HOURS, f"{job}/merged-{shard}-{day}", 1, 1, 10)
            for shard, day, _p in days
        ]


class Pieces:
    """A cluster's worth of stand-ins and the pieces wired as the processor wires them."""

    def __init__(self, tmp_path: Path, blocks: dict[int, list[dict[str, int]]]) -> None:
        self.settings = Settings(data_dir=tmp_path, groups=2, replicas=3, shards=4)
        self.catalog = Catalog(tmp_path / "catalog.sqlite")
        self.replicas = {
            g: [FakeReplica(blocks.get(g, []), oldest_open_hour=None) for _r in range(3)]
            for g in range(self.settings.groups)
        }
        self.directory = FakeDirectory(self.replicas)
        self.driver = FakeDriver(self.settings, self.directory, self.catalog)
        self.lock = asyncio.Lock()
        self.cycle = ProcessingCycle(
            self.settings,
            self.directory,  # type: ignore[arg-type]
            self.catalog,
            self.driver,
            self.lock,
            clock_ms=lambda: NOW_MS,
            retry_s=0,
        )
        self.runner = JobRunner(self.lock, on_failure=self.driver.forget_masters)
        self.jobs = WarehouseJobs(self.settings, self.catalog, self.driver, self.runner, self.lock)

    def master(self, group: int) -> FakeReplica:
        return self.replicas[group][0]


def block(shard: int, hour: int, seal_index: int) -> dict[str, int]:
    return {"shard": shard, "hour": hour, "part": 0, "seal_index": seal_index}


async def finished(runner: JobRunner, job_id: str) -> dict[str, Any]:
    for _ in range(500):
        state = runner.get(job_id)
        assert state is not None
        if state["state"] != "running":
            return state
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} did not finish")


# ---- the processing cycle ----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_cycle_seals_processes_publishes_releases_and_moves_the_watermark(
    tmp_path: Path,
) -> None:
    # shard s starts in group s mod 2
    p = Pieces(tmp_path, {0: [block(0, 100, 3), block(2, 100, 5)], 1: [block(1, 101, 4)]})
    p.master(0).oldest_open_hour = 102
    p.driver.parts[(2, 100)] = 2  # late events: a second part of an hour
    summary = await p.cycle.run("closed")

    assert [r.seal.calls for r in (p.master(0), p.master(1))] == [[("closed",)], [("closed",)]]
    assert p.driver.maps == [
        {
            "targets": [(0, 100), (1, 101), (2, 100)],
            "readers": [0, 1],
            "upto": {0: 5, 1: 4},
            "logic": "default",
        }
    ]
    assert (summary["blocks"], summary["units"], summary["events"]) == (3, 3, 30)
    assert summary["generation"] == 1
    assert {"seal_s", "map_s", "reduce_write_s", "seconds"} <= set(summary)
    assert (p.catalog.cursor(0), p.catalog.cursor(1)) == (5, 4)
    assert sorted(p.catalog.unit_map(1)) == [(0, 100), (1, 101), (2, 100)]
    for group, cursor in ((0, 5), (1, 4)):
        assert [r.published.calls for r in p.replicas[group]] == [[(cursor,)]] * 3
    assert p.catalog.watermark_ms() == 102 * HOUR_MS  # the oldest open hour
    assert (p.cycle.published, p.cycle.republished_units) == (1, 1)
    assert p.cycle.last_job == summary

    # Nothing new sealed: nothing published, nobody told, the last job kept.
    again = await p.cycle.run("due")
    assert (again["blocks"], again["units"]) == (0, 0) and len(p.driver.maps) == 1
    assert [len(r.published.calls) for r in p.replicas[0]] == [1, 1, 1]
    assert p.cycle.published == 1 and p.cycle.last_job == summary


@pytest.mark.anyio
async def test_with_no_open_block_the_watermark_is_the_current_minute(tmp_path: Path) -> None:
    p = Pieces(tmp_path, {})
    summary = await p.cycle.run("due")
    assert summary["blocks"] == 0 and p.driver.maps == []
    assert p.catalog.watermark_ms() == NOW_MS // 60_000 * 60_000
    assert p.cycle.last_job == {}


@pytest.mark.anyio
async def test_a_moved_shard_is_read_from_every_group_that_owned_it(tmp_path: Path) -> None:
    p = Pieces(tmp_path, {1: [block(0, 7, 9)]})
    p.catalog.move_shard(0, 0, 1)
    await asyncio.to_thread(p.catalog.publish, [], {0: 6})
    await p.cycle.run("due")
    # group 0 sealed nothing new, but holds shard 0's older parts up to its cursor
    assert p.driver.maps[0]["readers"] == [0, 1]
    assert p.driver.maps[0]["upto"] == {0: 6, 1: 9}


class RemoteError(Exception):
    """Like Ray's task error: the replica's own error is its ``cause``."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


@pytest.mark.anyio
async def test_a_run_that_meets_a_master_gone_starts_over_with_new_masters(
    tmp_path: Path,
) -> None:
    p = Pieces(tmp_path, {0: [block(0, 1, 2)]})
    p.master(0).seal_errors = [RemoteError(NotMaster("gone", leader=1)), NotMaster("again")]
    summary = await p.cycle.run("due")
    assert summary["units"] == 1 and len(p.master(0).seal.calls) == 3
    assert p.directory.forgotten == [0, 1, 0, 1], "every master asked again, twice"

    p.master(0).seal_errors = [NotMaster("gone")] * RUN_ATTEMPTS
    with pytest.raises(NotMaster):
        await p.cycle.run("due")
    p.master(0).seal_errors = [RuntimeError("disk full"), NotMaster("not reached")]
    with pytest.raises(RuntimeError, match="disk full"):
        await p.cycle.run("due")
    assert len(p.master(0).seal_errors) == 1, "any other error is not tried again"


@pytest.mark.anyio
async def test_a_cycle_waits_for_the_lock(tmp_path: Path) -> None:
    p = Pieces(tmp_path, {0: [block(0, 1, 2)]})
    async with p.lock:  # a job is running
        run = asyncio.create_task(p.cycle.run("due"))
        await asyncio.sleep(0.05)
        assert not run.done() and p.master(0).seal.calls == []
    assert (await run)["units"] == 1


# ---- compaction ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_compaction_merges_final_days_once(tmp_path: Path) -> None:
    p = Pieces(tmp_path, {})
    compactor = Compactor(p.catalog, p.driver, p.lock)
    assert await compactor.compact() == 0, "no watermark yet: nothing is final"
    hours = [Unit(1, h, f"u/{h}", 1, 1, 10) for h in (0, 5, 23, 24, 25)]
    p.catalog.publish(hours, {})
    p.catalog.set_watermark(26 * HOUR_MS)  # day 0 is final, day 1 is not
    assert await compactor.compact() == 1
    assert p.driver.merges == [[(1, 0, ["u/0", "u/5", "u/23"])]]
    assert compactor.merged_days == 1
    assert await compactor.compact() == 0 and compactor.merged_days == 1


# ---- the job runner --------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_job_reports_progress_then_its_result() -> None:
    clock = [1_000]
    runner = JobRunner(asyncio.Lock(), clock_ms=lambda: clock[0])
    go = asyncio.Event()

    async def work(state: dict[str, Any]) -> dict[str, Any]:
        state["total"] = 2
        state["done"] = 1
        await go.wait()
        state["done"] = 2
        return {"answer": 42}

    started = runner.start("reprocess", {"x": 1}, work)
    assert started["state"] == "running" and started["started_ms"] == 1_000
    await asyncio.sleep(0.01)
    now = runner.get(started["job"])
    assert now is not None and (now["done"], now["total"]) == (1, 2)
    assert runner.running() == [now]
    clock[0] = 3_500
    go.set()
    done = await finished(runner, started["job"])
    assert done["state"] == "done" and done["result"] == {"answer": 42}
    assert done["seconds"] == 2.5 and done["error"] is None
    assert runner.running() == [] and runner.get("no-such-job") is None


@pytest.mark.anyio
async def test_a_failed_job_reports_its_error_and_calls_on_failure() -> None:
    failures: list[str] = []
    runner = JobRunner(asyncio.Lock(), on_failure=lambda: failures.append("forget"))

    async def work(state: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("a replica went away")

    job = runner.start("rollback", {"to": 1}, work)
    done = await finished(runner, job["job"])
    assert done["state"] == "failed" and done["error"] == "RuntimeError: a replica went away"
    assert failures == ["forget"]


@pytest.mark.anyio
async def test_jobs_take_turns_on_the_lock() -> None:
    lock = asyncio.Lock()
    runner = JobRunner(lock)
    order: list[str] = []

    async def work(state: dict[str, Any]) -> dict[str, Any]:
        order.append(state["params"]["name"])
        return {}

    async with lock:  # a processing cycle is running
        a = runner.start("reprocess", {"name": "a"}, work)
        b = runner.start("reprocess", {"name": "b"}, work)
        await asyncio.sleep(0.05)
        assert order == [] and len(runner.running()) == 2
    await finished(runner, b["job"])
    await finished(runner, a["job"])
    assert order == ["a", "b"]


@pytest.mark.anyio
async def test_only_the_latest_finished_jobs_are_kept_and_running_ones_never_dropped() -> None:
    runner = JobRunner(asyncio.Lock())

    async def quick(state: dict[str, Any]) -> dict[str, Any]:
        return {}

    ids = []
    for _ in range(JOBS_KEPT + 5):
        ids.append(runner.start("reprocess", {}, quick)["job"])
        await finished(runner, ids[-1])
    assert [j for j in ids if runner.get(j) is not None] == ids[-JOBS_KEPT:], "oldest go first"
    async with runner.lock:  # a cycle runs: every job started now waits, still running
        waiting = [runner.start("reprocess", {}, quick)["job"] for _ in range(JOBS_KEPT + 5)]
        assert len(runner.running()) == JOBS_KEPT + 5, "a running job is never forgotten"
        assert [j for j in ids if runner.get(j) is not None] == ids[-JOBS_KEPT + 1 :]
    for job_id in waiting:
        assert (await finished(runner, job_id))["state"] == "done"


# ---- re-processing, rollback and shard moves -----------------------------------------------


@pytest.mark.anyio
async def test_bad_requests_are_refused_before_any_job_starts(tmp_path: Path) -> None:
    p = Pieces(tmp_path, {})
    with pytest.raises(ValueError, match="end must be after start"):
        await p.jobs.reprocess(10, 10)
    with pytest.raises(ValueError, match="at least one site"):
        await p.jobs.reprocess(0, 10, sites=[])
    with pytest.raises(ValueError, match=f"at most {SITES_MAX} sites"):
        await p.jobs.reprocess(0, 10, sites=[f"s{i}.com" for i in range(SITES_MAX + 1)])
    with pytest.raises(ValueError, match="unknown processing logic"):
        await p.jobs.reprocess(0, 10, logic="no-such-logic")
    with pytest.raises(ValueError, match="no previous version"):
        await p.jobs.rollback()
    with pytest.raises(ValueError, match="already current"):
        await p.jobs.rollback(1)
    with pytest.raises(ValueError):
        await p.jobs.rollback(7)
    with pytest.raises(ValueError, match="no shard 4"):
        await p.jobs.move_shard(4, 0)
    with pytest.raises(ValueError, match="no group 2"):
        await p.jobs.move_shard(0, 2)
    with pytest.raises(ValueError, match="in group 0 already"):
        await p.jobs.move_shard(0, 0)
    assert p.runner.running() == [] and p.catalog.shard_moves() == []


@pytest.mark.anyio
async def test_reprocess_makes_a_new_version_and_rollback_returns(tmp_path: Path) -> None:
    p = Pieces(tmp_path, {})
    p.catalog.publish([Unit(s, h, f"v1/{s}-{h}", 1, 1, 10) for s in (0, 1) for h in (10, 11)], {})
    p.driver.diffs[(0, 10)] = (10, 7)
    job = await p.jobs.reprocess(10 * HOUR_MS, 11 * HOUR_MS - 1)
    done = await finished(p.runner, job["job"])
    assert done["state"] == "done", done["error"]
    assert (done["done"], done["total"]) == (2, 2)
    result = done["result"]
    assert (result["from_version"], result["version"], result["units"]) == (1, 2, 2)
    assert (result["sites_changed"], result["events_before"], result["events_after"]) == (
        1,
        20,
        17,
    )
    assert result["changes"] == [
        {"site": "s0.com", "buckets_changed": 1, "before": 10, "after": 7, **NO_OTHER_CHANGE}
    ]
    now = p.catalog.unit_map(2)
    assert now[(0, 10)].path != "v1/0-10" and now[(0, 11)].path == "v1/0-11"

    dry = await finished(p.runner, (await p.jobs.reprocess(0, 20 * HOUR_MS, dry_run=True))["job"])
    assert dry["result"]["version"] is None and p.catalog.current_version() == 2

    # published into version 2 after it left version 1: re-made with version 1's logic
    p.catalog.publish([Unit(1, 12, "v2/1-12", 1, 1, 10)], {})
    back = await finished(p.runner, (await p.jobs.rollback())["job"])
    assert back["state"] == "done", back["error"]
    assert back["result"]["version"] == 1 and back["result"]["units_brought_up_to_date"] == 1
    assert p.catalog.current_version() == 1


@pytest.mark.anyio
async def test_reprocess_of_some_sites_reads_only_their_shards(tmp_path: Path) -> None:
    p = Pieces(tmp_path, {})
    p.catalog.publish([Unit(s, 10, f"v1/{s}", 1, 1, 10) for s in range(4)], {})
    job = await p.jobs.reprocess(0, 20 * HOUR_MS, sites=["Example.COM."], dry_run=True)
    assert job["params"]["sites"] == ["example.com"]
    await finished(p.runner, job["job"])
    assert p.driver.maps[0]["targets"] == [(shard_for_site("example.com", 4), 10)]


@pytest.mark.anyio
async def test_a_shard_move_is_recorded_and_answered_with_the_new_owners(tmp_path: Path) -> None:
    p = Pieces(tmp_path, {})
    moved = await p.jobs.move_shard(2, 1)
    assert moved == {"shard": 2, "from_group": 0, "to_group": 1, "owners": [0, 1, 1, 1]}
    assert p.catalog.shard_moves() == [(2, 0, 1)]


# ---- the schedule and gateway supervision --------------------------------------------------


class FakeGateway:
    def __init__(self, started: bool, answers: bool = True) -> None:
        self.started = started
        self.answers = answers
        self.ping = Method(self._ping)
        self.start = Method(self._start)

    async def _ping(self) -> dict[str, Any]:
        if not self.answers:
            await asyncio.Event().wait()  # never
        return {"started": self.started}

    async def _start(self) -> int:
        self.started = True
        return 8001


def lookup_in(gateways: dict[str, Any]) -> Callable[[str, str, float], Awaitable[Any]]:
    async def lookup(name: str, namespace: str, timeout_s: float) -> Any:
        found = gateways.get(name)
        if isinstance(found, Exception):
            raise found
        if found is None:
            raise ValueError(f"no actor {name}")
        return found

    return lookup


@pytest.mark.anyio
async def test_a_gateway_back_without_its_server_is_started_again() -> None:
    gateways: dict[str, Any] = {
        gateway_name(0): FakeGateway(started=True),
        gateway_name(1): FakeGateway(started=False),
        gateway_name(2): TimeoutError(),  # Ray's GCS slow: passed over this time
    }
    supervisor = GatewaySupervisor(Settings(gateways=4), lookup=lookup_in(gateways))
    assert await supervisor.keep_gateways() is True
    assert gateways[gateway_name(1)].start.calls == [()]
    assert gateways[gateway_name(0)].start.calls == []
    assert await supervisor.keep_gateways() is False


@pytest.mark.anyio
async def test_a_gateway_that_never_answers_its_ping_does_not_stop_processing() -> None:
    silent = FakeGateway(started=True, answers=False)
    supervisor = GatewaySupervisor(
        Settings(rpc_timeout_s=0.1), lookup=lookup_in({gateway_name(0): silent})
    )
    errors: list[tuple[str, str]] = []
    schedule = Schedule(lambda what, exc: errors.append((what, type(exc).__name__)))
    cycles = 0

    async def cycle() -> None:
        nonlocal cycles
        cycles += 1

    # as the processor wires them
    schedule.every(0.01, "processing cycle", cycle)
    schedule.every(0.01, "gateway supervision", supervisor.keep_gateways)
    schedule.start()
    await asyncio.sleep(0.6)
    await schedule.stop()
    assert len(silent.ping.calls) >= 2, "supervision went on, one ping at a time"
    assert set(errors) == {("gateway supervision", "TimeoutError")}
    # Each supervision pass waits 0.1 s for the ping; the cycle never waited for it.
    assert cycles >= 2 * len(silent.ping.calls), (cycles, len(silent.ping.calls))


@pytest.mark.anyio
async def test_a_failing_step_is_reported_and_runs_again() -> None:
    errors: list[str] = []
    schedule = Schedule(lambda what, exc: errors.append(f"{what}: {exc}"))
    runs = 0

    async def fails() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError(f"run {runs}")

    schedule.every(0.01, "processing cycle", fails)
    schedule.start()
    schedule.start()  # already running: no second task
    await asyncio.sleep(0.2)
    await schedule.stop()
    stopped_at = runs
    assert runs >= 3 and errors[:2] == ["processing cycle: run 1", "processing cycle: run 2"]
    schedule.start()  # stopped for good
    await asyncio.sleep(0.05)
    assert runs == stopped_at
