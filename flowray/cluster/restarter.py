"""Rolling restart: replace every process of a running cluster, one at a time.

For each group, the followers are restarted first, each waited for until it has
recovered from its disk and caught up with the master; then the master hands
mastership over to its most up-to-date follower (writes are refused for that moment,
503 with Retry-After, resent by clients with the same ids) and is restarted in turn.
Then the processor, the ingest gateway and the Serve replicas (a Serve rolling update).
New processes load the code installed now, so this is also how flowray is upgraded.

The restarter is a detached actor of its own, started with the cluster and named
RESTARTER_NAME, so that restarting the API process that asked for a restart does not
stop it; the API finds it by name (it imports nothing of this module) and it
remembers the progress of its last job for whoever polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from flowray.actors.directory import Directory, NoMaster
from flowray.actors.names import PROCESSOR_NAME, gateway_name
from flowray.actors.replica import NotMaster
from flowray.config import Settings
from flowray.serve.deployment import deploy_api

CATCH_UP_TIMEOUT_S = 180.0
POLL_S = 0.2
HANDOVER_ATTEMPTS = 10
log = logging.getLogger("flowray.restarter")


def _now_ms() -> int:
    return int(time.time() * 1000)


@ray.remote(num_cpus=0, max_restarts=-1)
class Restarter:
    def __init__(self, settings_json: dict[str, Any]) -> None:
        self.settings = Settings.from_json(settings_json)
        self.directory = Directory(self.settings)
        self.progress: dict[str, Any] = {"job": None, "kind": "restart", "state": "idle"}
        self._task: asyncio.Task[None] | None = None

    async def start(self, job_id: str) -> dict[str, Any]:
        """Begin a rolling restart as job ``job_id``; ValueError while one is running."""
        if self._task is not None and not self._task.done():
            raise ValueError(f"a rolling restart is already running ({self.progress['job']})")
        self.progress = {
            "job": job_id,
            "kind": "restart",
            "state": "running",
            "done": 0,
            "total": None,
            "steps": [],
            "result": None,
            "error": None,
            "started_ms": _now_ms(),
        }
        self._task = asyncio.create_task(self._run())
        return dict(self.progress)

    async def status(self) -> dict[str, Any]:
        return dict(self.progress)

    def _step(self, text: str) -> None:
        self.progress["steps"].append(text)
        # A master that moved mid-restart adds steps: the total grows with them.
        self.progress["done"] += 1
        self.progress["total"] = max(self.progress["total"], self.progress["done"])
        log.info("rolling restart: %s", text)

    async def _run(self) -> None:
        try:
            await self._restart_all()
            self.progress["state"] = "done"
            self.progress["result"] = {"steps": list(self.progress["steps"])}
        except Exception as exc:  # reported to whoever polls
            self.progress["state"] = "failed"
            self.progress["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("rolling restart failed: %s", self.progress["error"])
        finally:
            self.progress["seconds"] = round((_now_ms() - self.progress["started_ms"]) / 1000, 3)

    async def _restart_all(self) -> None:

        s, ns = self.settings, self.settings.namespace
        replicas = {
            (g, r): self.directory.handle(g, r) for g in range(s.groups) for r in range(s.replicas)
        }
        processor = ray.get_actor(PROCESSOR_NAME, namespace=ns)
        gateways = []
        for i in range(s.gateways):
            with contextlib.suppress(ValueError):  # this cluster runs without gateways
                gateways.append(ray.get_actor(gateway_name(i), namespace=ns))
        handovers = s.groups if s.replicas > 1 else 0
        self.progress["total"] = len(replicas) + handovers + 2 + len(gateways)
        for g in range(s.groups):
            group = {r: replicas[(g, r)] for r in range(s.replicas)}
            master = await self._restart_followers(g, group)
            await self._restart_replica(g, master, group[master], group)
            self._step(f"group {g}: replica {master} (was master) restarted and caught up")
        await self._restart_actor(processor)
        await self._when_up(processor.start.remote)
        self._step("processor restarted")
        # One at a time: the others keep serving the shared port meanwhile.
        for i, gateway in enumerate(gateways):
            await self._restart_actor(gateway)
            await self._when_up(gateway.start.remote)
            self._step(f"ingest gateway {i} restarted")
        await asyncio.to_thread(deploy_api, s, uuid.uuid4().hex)
        self._step("Serve replicas replaced (rolling update)")

    async def _restart_followers(self, g: int, group: dict[int, Any]) -> int:
        """Restart every follower, then hand mastership over; returns the old master.

        Mastership may move at any time (an election under load, a handover that
        lands late), so the master is looked up again after each step, and a
        replica that became a follower meanwhile is restarted as one.
        """
        restarted: set[int] = set()
        for _attempt in range(HANDOVER_ATTEMPTS):
            master = await self._master_of(g)
            todo = [r for r in group if r != master and r not in restarted]
            for r in todo:
                await self._restart_replica(g, r, group[r], group)
                restarted.add(r)
                self._step(f"group {g}: follower {r} restarted and caught up")
            if todo:
                continue  # the master may have changed while they restarted
            if len(group) == 1:
                return master
            try:
                new: int | None = await asyncio.wait_for(
                    group[master].hand_over.remote(), self.settings.rpc_timeout_s
                )
            except RayTaskError as exc:
                if not isinstance(exc.cause, NotMaster):
                    raise
                continue  # it stopped being master before the handover: look again
            self._step(
                f"group {g}: mastership handed over from {master} to {new}"
                if new is not None
                else f"group {g}: no handover from {master} in time; an election follows"
            )
            return master
        raise RuntimeError(f"group {g}: mastership kept moving; no handover in {HANDOVER_ATTEMPTS}")

    async def _master_of(self, group: int) -> int:
        """The group's master, waiting out an election."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while True:
            self.directory.forget(group)  # ask the replicas, not an old guess
            try:
                replica, _handle = await self.directory.master(group)
                return replica
            except NoMaster:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"group {group} has no master") from None
                await asyncio.sleep(POLL_S)

    async def _when_up(self, call: Any) -> Any:
        """``call()`` once the (restarting) actor answers it."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while True:
            try:
                return await asyncio.wait_for(call(), CATCH_UP_TIMEOUT_S)
            except (ActorUnavailableError, RayActorError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(POLL_S)

    async def _restart_actor(self, handle: Any) -> None:
        """Kill the actor's process; Ray starts a new one (the actor restarts)."""
        ray.kill(handle, no_restart=False)
        await asyncio.sleep(POLL_S)

    async def _restart_replica(
        self, group: int, replica: int, handle: Any, handles: dict[int, Any]
    ) -> None:
        """Restart one replica and wait until it has caught up with the group's commit."""
        timeout = self.settings.rpc_timeout_s
        statuses = await asyncio.gather(
            *(asyncio.wait_for(h.status.remote(), timeout) for h in handles.values()),
            return_exceptions=True,
        )
        before = statuses[list(handles).index(replica)]
        if not isinstance(before, dict):
            raise RuntimeError(f"group {group} replica {replica} does not answer: {before!r}")
        target = max(st["commit_index"] for st in statuses if isinstance(st, dict))
        await self._restart_actor(handle)
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while True:
            try:
                st = await asyncio.wait_for(handle.status.remote(), timeout)
                if st["pid"] != before["pid"] and st["commit_index"] >= target:
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group} replica {replica} did not catch up")
            await asyncio.sleep(POLL_S)
