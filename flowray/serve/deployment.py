"""The Ray Serve deployment: the app factory, fed with handles to the cluster's actors.

Serve evaluates ``build_app`` on each replica, so every replica has its own DuckDB
connections, cache client and actor handles. Settings travel in an environment
variable of the replica's runtime environment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.serve import Application

from flowray.actors.directory import Directory, NoMaster
from flowray.actors.names import PROCESSOR_NAME, RESTARTER_NAME
from flowray.actors.replica import NoQuorum, NotMaster, Overloaded
from flowray.actors.wire import LinkDown
from flowray.api.app import Unavailable, create_app
from flowray.api.auth import ADMIN_TOKEN_ENV, Authorizer, TokenStore
from flowray.api.insights import WarehouseInsights
from flowray.config import Settings
from flowray.core.router import ShardMap, shard_for_site
from flowray.ingest.events import Row, rows_table
from flowray.ingest.pieces import GroupEvents, Piece, Routed, merge_pieces, ordered
from flowray.query import facts
from flowray.query.cache import make_cache
from flowray.warehouse.catalog import LiveShardMap
from flowray.warehouse.files import Warehouse

log = logging.getLogger("flowray.deployment")

SETTINGS_ENV = "FLOWRAY_SETTINGS_JSON"
APP_NAME = "flowray"  # the Serve application
DEPLOY_GENERATION_ENV = "FLOWRAY_DEPLOY_GENERATION"
LOCAL_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def bind_replica_grpc_to_loopback() -> None:
    """In local mode, keep this Serve replica's inter-deployment gRPC server on 127.0.0.1.

    Works around Ray 2.60's ``ray.serve._private.replica``, which binds each replica's
    internal gRPC server to ``[::]:0`` (``add_port_to_grpc_server(self._server,
    "[::]:0")`` in ``_on_initialized``) whatever the node address is; a local flowray
    must listen on loopback only. Called by the deployment's constructor, in the replica
    process, before Serve starts that server; it wraps only that wildcard address and
    only when Ray runs single-node on loopback. Still needed while that line of Ray's
    replica.py binds a wildcard address: check it after upgrading Ray (``ss -ltnp`` on a
    local cluster shows any Serve replica port on ``*`` or ``[::]``).
    """
    if os.environ.get(LOCAL_MODE_ENV) != "0":
        return
    from ray.serve._private import replica as serve_replica

    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_flowray_loopback", False):
        return

    def loopback(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    loopback._flowray_loopback = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = loopback


_UNAVAILABLE = (
    NotMaster,
    NoQuorum,
    Overloaded,
    NoMaster,
    RayActorError,
    ActorUnavailableError,
    GetTimeoutError,
    TimeoutError,
    LinkDown,
)
RETRY_AFTER_ELECTION_S = 1
# While a group has no master (an election), the ingress asks again this often, within
# commit_timeout_s.
MASTER_RETRY_S = 0.05
# Tries of one proposal (new masters, resends), at most, within commit_timeout_s.
PROPOSE_ATTEMPTS_MAX = 200
# A proposal's deadline grows by a second per this many bytes beyond the base
# (propose_deadline_s): the fleet's largest proposals take milliseconds a megabyte.
DEADLINE_BYTES_PER_S = 64 * 1024 * 1024
RESTART_JOB_PREFIX = "restart-"
ACTOR_START_TIMEOUT_S = 45.0  # below the CLI client's 60 s
# A query waits this long for live counts before answering from the warehouse alone.
LIVE_TIMEOUT_S = 1.0
# Proposals in flight per group from one ingress process; more requests wait and
# are merged into the next proposal. Measured on the 2-core reference machine at the
# fleet rate: 1 in flight gave ack p50 41 ms / p99 96 ms, 2 gave 59 / 158, 4 gave
# 119 / 223, 16 gave 199 / 346 ms, and 1 also gave the most events/s: a master's cost
# is per proposal, so fewer, larger proposals win.
INFLIGHT_PER_GROUP = 1
# Linger: while the ingress is busy (the group's last proposal ended less than
# BUSY_GAP_S ago), a new proposal waits LINGER_S for more writes, unless its batch
# already holds LINGER_BYTES_MAX. Busy clients' requests arrive spread out, and the
# first of them used to leave alone in a proposal, whose cost at the replicas is
# mostly per proposal. At low load nothing ended that recently and a write leaves at
# once. A/B on fresh clusters on the reference machine, 1,000-event NDJSON from 16
# connections: 965-1,093 -> 1,266-1,383 requests/s, the replicas' CPU per request
# down a third; at the fleet rate ack p50 2.8-3.6 -> 3.7-4.7 ms, p99 8.0-10.1 ->
# 9.2-10.8 ms. (A 2 ms gap made no difference: proposals follow each other 2-10 ms
# apart.)
LINGER_S = 0.001
# RayIngest.warm: how long it keeps looking for masters, and how often.
WARM_S = 10.0
WARM_RETRY_S = 0.2
BUSY_GAP_S = 0.010
LINGER_BYTES_MAX = 1024 * 1024
# Writes waiting for a group's next proposal, at most: beyond it, 503 (back off).
QUEUED_BYTES_MAX = 256 * 1024 * 1024
ROW_BYTES_ESTIMATE = 128  # what a queued row costs, for that bound
# A proposal's events are split into pieces on the event loop up to this size, and on
# a worker thread beyond it (Arrow releases the GIL; the loop keeps answering).
SPLIT_INLINE_BYTES_MAX = 256 * 1024


def cause(exc: BaseException) -> BaseException:
    """The exception an actor raised, unwrapped from Ray's RayTaskError."""
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


class _Batch:
    """Writes of several requests for one group, sent as one proposal."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.routed: list[Routed] = []
        self.futures: list[asyncio.Future[None]] = []
        self.bytes = 0

    @staticmethod
    def size_of(events: GroupEvents) -> int:
        if isinstance(events, Routed):
            return events.bytes
        return ROW_BYTES_ESTIMATE * len(events)

    def add(self, events: GroupEvents, future: asyncio.Future[None]) -> None:
        self.bytes += self.size_of(events)
        if isinstance(events, Routed):
            self.routed.append(events)
        else:
            self.rows.extend(events)
        self.futures.append(future)

    def all_have_ids(self) -> bool:
        """Whether every event carries an id: then the proposal may be sent again after
        its outcome became unknown, since counting keeps one event per (site, id)."""
        return all(row[6] is not None for row in self.rows) and all(
            "id" in r.table.column_names and r.table.column("id").null_count == 0
            for r in self.routed
        )

    def pieces(self, shard_count: int) -> list[Piece]:
        """The proposal's pieces: each request's runs sliced, those of one (shard,
        hour) together; rows from the exact parser are ordered here first."""
        routed = self.routed
        if self.rows:
            rows = ordered(rows_table(self.rows), shard_count)
            routed = [*([rows] if rows is not None else []), *routed]
        return merge_pieces(routed)


def should_linger(queued_bytes: int, since_last_proposal_s: float) -> bool:
    """Whether a group's next proposal waits LINGER_S for more writes (see LINGER_S)."""
    return since_last_proposal_s < BUSY_GAP_S and queued_bytes < LINGER_BYTES_MAX


class RayIngest:
    """Micro-batches writes per group into few proposals and waits for their commits.

    Requests that arrive while a group's proposal is in flight are queued and sent
    together once the slot frees up: group commit at the ingress. A request costs
    its parsing and routing (a table's rows come ordered in (shard, hour) runs); the
    pieces are cut and encoded once per proposal, and single events from the exact
    parser become a table only then, so a thousand single-event requests cost one
    table and one call to the master. Every request is still answered only after its
    own events are committed.
    """

    def __init__(self, settings: Settings, directory: Directory) -> None:
        self.settings = settings
        self.directory = directory
        self._queued: dict[int, _Batch] = {}
        self._slots: dict[int, asyncio.Semaphore] = {}
        self._ended: dict[int, float] = {}  # when each group's last proposal ended

    async def commit(self, groups: dict[int, GroupEvents]) -> None:
        await asyncio.gather(*(self._submit(g, events) for g, events in groups.items()))

    async def warm(self, within_s: float = WARM_S) -> int:
        """Find each group's master and connect to it ahead of the first write, which
        otherwise waits for the lookups and the connection (about 0.1 s on the 2-core
        reference machine, at a cluster's start and after a gateway's restart). Groups
        without a master yet (an election at start) are asked again until ``within_s``
        has passed. Returns how many groups are connected."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within_s

        async def one(group: int) -> bool:
            while loop.time() < end:
                try:
                    replica, _handle = await self.directory.master(group)
                    link = self.directory.link(group, replica)
                    if await link.connect(max(0.0, end - loop.time())):
                        return True
                except Exception as exc:  # only a head start: writes find masters anyway
                    log.debug("warming group %d: %s", group, exc)
                await asyncio.sleep(WARM_RETRY_S)
            return False

        done = await asyncio.gather(*(one(g) for g in range(self.settings.groups)))
        return sum(done)

    async def _submit(self, group: int, events: GroupEvents) -> None:
        batch = self._queued.setdefault(group, _Batch())
        if batch.bytes and batch.bytes + batch.size_of(events) > QUEUED_BYTES_MAX:
            raise Unavailable(
                f"group {group}: {batch.bytes} bytes already wait for the next proposal",
                RETRY_AFTER_ELECTION_S,
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch.add(events, future)
        if len(batch.futures) == 1:
            asyncio.create_task(self._drain(group))
        await future

    async def _drain(self, group: int) -> None:
        slots = self._slots.setdefault(group, asyncio.Semaphore(INFLIGHT_PER_GROUP))
        async with slots:
            loop = asyncio.get_running_loop()
            waiting = self._queued.get(group)
            if waiting is not None and should_linger(
                waiting.bytes, loop.time() - self._ended.get(group, -math.inf)
            ):
                await asyncio.sleep(LINGER_S)
            batch = self._queued.pop(group, None)
            if batch is None:
                return  # an earlier drain took these writes along
            try:
                if batch.bytes > SPLIT_INLINE_BYTES_MAX:  # off the event loop, as parsing
                    pieces = await asyncio.to_thread(batch.pieces, self.settings.shards)
                else:
                    pieces = batch.pieces(self.settings.shards)
                await self._propose(group, pieces, batch.all_have_ids())
            except Unavailable as exc:
                for f in batch.futures:
                    if not f.done():
                        f.set_exception(exc)
                return
            except BaseException as exc:
                for f in batch.futures:
                    if not f.done():
                        f.set_exception(exc)
                raise
            finally:
                self._ended[group] = loop.time()
            for f in batch.futures:
                if not f.done():
                    f.set_result(None)

    async def _propose(self, group: int, pieces: list[Piece], resendable: bool) -> None:
        """Send one proposal to the group's master and wait for its commit.

        Every wait is bounded: all tries together have commit_timeout_s. A master that
        has not committed by ``deadline_for`` is checked (:meth:`_wait_while_followed`):
        while enough of its followers still follow it no other master can exist, and
        it is only slow, so the wait goes on; once they stand or follow another (it is
        paused, cut off, its disk hung) it is given up: the directory suspects it, and
        the proposal goes to the group's next master, but only if ``resendable`` (every
        event has an id: a copy that the first master appended may still commit, and
        counting keeps one event per id). Otherwise the writer gets 503 at once."""
        payload = [(p.shard, p.hour, p.payload, p.events) for p in pieces]
        deadline_s = deadline_for(self.settings, sum(len(p.payload) for p in pieces))
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.commit_timeout_s
        for _attempt in range(PROPOSE_ATTEMPTS_MAX):
            left = end - loop.time()
            if left <= 0:
                break
            try:
                replica, _handle = await asyncio.wait_for(self.directory.master(group), left)
            except (NoMaster, TimeoutError):
                await asyncio.sleep(MASTER_RETRY_S)  # an election is on: ask again soon
                continue
            link = self.directory.link(group, replica)
            call = asyncio.ensure_future(link.call("propose", payload, max(left, 0.001)))
            try:
                await self._wait_while_followed(group, replica, call, deadline_s, end)
                return
            except _UNAVAILABLE as exc:
                inner = cause(exc)
                hint = getattr(inner, "leader", None)
                self.directory.forget(group, hint)
                # Refused before anything was appended, with a better guess: try it now.
                if isinstance(inner, NotMaster) and inner.refused and hint is not None:
                    continue
                if isinstance(inner, TimeoutError):
                    self.directory.suspect(group, replica)
                if not resendable or isinstance(inner, Overloaded):
                    raise Unavailable(
                        f"group {group} cannot commit now: {type(inner).__name__}: {inner}",
                        RETRY_AFTER_ELECTION_S,
                    ) from exc
                log.info("group %d: %s; resending to the next master", group, inner)
        raise Unavailable(
            f"group {group}: no master committed within {self.settings.commit_timeout_s} s",
            RETRY_AFTER_ELECTION_S,
        )

    async def _wait_while_followed(
        self,
        group: int,
        replica: int,
        call: asyncio.Future[Any],
        deadline_s: float,
        end: float,
    ) -> Any:
        """The proposal's answer; TimeoutError once the master is given up: past its
        deadline, when its followers no longer vouch for it (Directory.still_followed,
        asked every replication tick so that a master is given up as soon as an
        election ends, and itself bounded by ``end``); or at ``end``. An answer that
        arrives while the followers are asked wins over their verdict."""
        loop = asyncio.get_running_loop()
        wait_s = deadline_s
        try:
            while True:
                wait_s = min(wait_s, end - loop.time())
                if wait_s <= 0:
                    raise TimeoutError(f"no commit within {self.settings.commit_timeout_s} s")
                done, _ = await asyncio.wait({call}, timeout=wait_s)
                if done:
                    return call.result()
                followed = await asyncio.wait_for(
                    self.directory.still_followed(group, replica), max(end - loop.time(), 0.001)
                )
                if call.done():  # answered while its followers were asked: take the answer
                    return call.result()
                if not followed:
                    raise TimeoutError(f"replica {replica} missed its deadline and lost its group")
                wait_s = self.settings.tick_s
        finally:
            call.cancel()


def deadline_for(settings: Settings, payload_bytes: int) -> float:
    """How long a master has to commit a proposal of ``payload_bytes``."""
    return settings.propose_deadline_s + payload_bytes / DEADLINE_BYTES_PER_S


class RayLive:
    """Live counts of a site from its group's master; none when it cannot answer in time."""

    def __init__(
        self,
        settings: Settings,
        directory: Directory,
        shard_map: Callable[[], ShardMap],
        warehouse: Warehouse,
    ) -> None:
        self.settings, self.directory = settings, directory
        self.shard_map, self.warehouse = shard_map, warehouse

    async def minutes(self, site: str, start_ms: int, end_ms: int) -> tuple[Any, Any]:
        group = self.shard_map().group_of_site(site)
        published = self.warehouse.catalog.cursor(group)
        try:
            _replica, handle = await self.directory.master(group)
            minutes, counts = await asyncio.wait_for(
                handle.live_minutes.remote(site, start_ms, end_ms, published),
                LIVE_TIMEOUT_S,
            )
        except _UNAVAILABLE as exc:
            self.directory.forget(group, getattr(cause(exc), "leader", None))
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.asarray(minutes, np.int64), np.asarray(counts, np.int64)

    async def facts(self, site: str, start_ms: int, end_ms: int) -> pa.Table | None:
        """Fact rows of ``site`` in [start, end) that the warehouse does not hold yet,
        derived here from the raw events its master kept; None when it cannot answer in
        time (the answer then holds the warehouse's rows alone)."""
        group = self.shard_map().group_of_site(site)
        published = self.warehouse.catalog.cursor(group)
        try:
            _replica, handle = await self.directory.master(group)
            raw = await asyncio.wait_for(
                handle.live_facts.remote(
                    site, start_ms, end_ms, published, shard_for_site(site, self.settings.shards)
                ),
                LIVE_TIMEOUT_S,
            )
        except _UNAVAILABLE as exc:
            self.directory.forget(group, getattr(cause(exc), "leader", None))
            return None
        if raw is None:
            return None
        return await asyncio.to_thread(facts.live_facts, site, raw)


class RayAdmin:
    """Status of every replica and the processor, and on-demand processing."""

    def __init__(self, settings: Settings, directory: Directory) -> None:
        self.settings = settings
        self.directory = directory
        ns = settings.namespace
        self.replicas = {
            (g, r): directory.handle(g, r)
            for g in range(settings.groups)
            for r in range(settings.replicas)
        }
        self.processor = ray.get_actor(PROCESSOR_NAME, namespace=ns)

    async def _ask(self, call: Any, timeout: float) -> Any:
        try:
            return await asyncio.wait_for(call, timeout)
        except _UNAVAILABLE as exc:
            return {"status": "down", "error": f"{type(exc).__name__}: {exc}"}

    async def status(self) -> dict[str, Any]:
        timeout = self.settings.rpc_timeout_s
        answers = await asyncio.gather(
            *(self._ask(h.status.remote(), timeout) for h in self.replicas.values())
        )
        groups: dict[int, list[dict[str, Any]]] = {}
        for (g, r), answer in zip(self.replicas, answers, strict=True):
            answer.setdefault("group", g)
            answer.setdefault("replica", r)
            groups.setdefault(g, []).append(answer)
        processor = await self._ask(self.processor.status.remote(), timeout)
        return {
            "groups": [{"group": g, "replicas": reps} for g, reps in sorted(groups.items())],
            "processor": processor,
            "layout": {
                "groups": self.settings.groups,
                "replicas": self.settings.replicas,
                "shards": self.settings.shards,
            },
        }

    async def process(self, mode: str) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await asyncio.wait_for(
                self.processor.run.remote(mode), self.settings.process_timeout_s
            )
            return result
        except _UNAVAILABLE as exc:
            raise Unavailable(f"processing did not finish: {type(exc).__name__}: {exc}") from exc

    async def _call(
        self, call: Any, timeout_s: float | None = None, what: str = "the processor"
    ) -> Any:
        """A quick actor call: ValueError passes through, the rest is Unavailable."""
        try:
            return await asyncio.wait_for(call, timeout_s or self.settings.rpc_timeout_s)
        except ValueError as exc:  # from the actor: a RayTaskError that is a ValueError
            raise ValueError(str(getattr(exc, "cause", None) or exc)) from None
        except _UNAVAILABLE as exc:
            raise Unavailable(f"{what} did not answer: {type(exc).__name__}") from exc

    async def reprocess(self, request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self.processor.reprocess.remote(**request))
        return result

    async def rollback(self, to_version: int | None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self.processor.rollback.remote(to_version))
        return result

    async def job(self, job_id: str) -> dict[str, Any] | None:
        if job_id.startswith(RESTART_JOB_PREFIX):
            restarter = self._restarter()
            if restarter is None:
                return None
            state: dict[str, Any] = await self._call(
                restarter.status.remote(), what="the restarter"
            )
            return state if state["job"] == job_id else None
        result: dict[str, Any] | None = await self._call(self.processor.job.remote(job_id))
        return result

    def _restarter(self) -> Any:
        try:
            return ray.get_actor(RESTARTER_NAME, namespace=self.settings.namespace)
        except ValueError:
            return None

    async def restart(self) -> dict[str, Any]:
        """Start a rolling restart in the cluster's restarter (a detached actor started
        with the cluster: see flowray/cluster/restarter.py)."""
        restarter = self._restarter()
        if restarter is None:
            raise Unavailable("the cluster's restarter is not running", RETRY_AFTER_ELECTION_S)
        job_id = f"{RESTART_JOB_PREFIX}{uuid.uuid4().hex[:12]}"
        # Ray may be restarting the restarter's process: allow for its start.
        result: dict[str, Any] = await self._call(
            restarter.start.remote(job_id), ACTOR_START_TIMEOUT_S, "the restarter"
        )
        return result

    async def versions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call(self.processor.versions.remote())
        return result

    async def move_shard(self, shard: int, to_group: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self.processor.move_shard.remote(shard, to_group))
        return result


def build_app() -> FastAPI:
    settings = Settings.from_json(json.loads(os.environ[SETTINGS_ENV]))
    warehouse = Warehouse(settings.warehouse_dir, settings.shards, settings.query_threads)
    directory = Directory(settings)
    shard_map = LiveShardMap(settings.base_map(), warehouse.catalog)
    prefix = f"flowray:{warehouse.catalog.identity}:"
    live = RayLive(settings, directory, shard_map, warehouse)
    return create_app(
        settings=settings,
        shard_map=shard_map,
        live=live,
        insights=WarehouseInsights(warehouse, live.facts, settings.query_timeout_s),
        ingest=RayIngest(settings, directory),
        warehouse=warehouse,
        admin=RayAdmin(settings, directory),
        cache=make_cache(
            settings.redis_url, settings.redis_timeout_s, settings.cache_ttl_s, prefix
        ),
        authorizer=build_authorizer(settings),
    )


def build_authorizer(settings: Settings) -> Authorizer:
    """Tokens from the data directory's store; the admin token from this process's env.

    The admin token is read here, not shipped in the settings blob, because that blob
    travels in Ray runtime environments where anyone with dashboard access can read it.
    Ray workers inherit the environment of the node they run on, so FLOWRAY_ADMIN_TOKEN
    set for 'flowray up' (or on every node of a joined cluster) reaches each API process.
    """
    return Authorizer(
        TokenStore(settings.tokens_file),
        mode=settings.auth,
        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
    )


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
    # An access-log line per request costs more than a cached query; Prometheus
    # metrics at /metrics count requests instead.
    logging_config={"enable_access_log": False},
)
@serve.ingress(build_app)
class Api:
    """flowray's HTTP API on Ray Serve."""

    def __init__(self) -> None:
        bind_replica_grpc_to_loopback()


def api_application(settings: Settings, generation: str = "") -> Application:
    """The Serve application of the API, its settings in the replicas' environment. A
    new ``generation`` changes that environment, so Serve replaces the replicas one by
    one (a rolling update)."""
    env = {SETTINGS_ENV: json.dumps(settings.to_json())}
    if generation:
        env[DEPLOY_GENERATION_ENV] = generation
    return Api.options(  # type: ignore[attr-defined,no-any-return]
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}}
    ).bind()


def deploy_api(settings: Settings, generation: str = "") -> None:
    """Deploy (or redeploy) the Serve app; see ``api_application``."""
    serve.run(api_application(settings, generation), name=APP_NAME, route_prefix="/")
