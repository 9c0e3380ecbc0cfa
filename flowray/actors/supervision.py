"""Background work on a schedule, and the supervision of the ingest gateways.

The processor repeats two things: the processing cycle, and checking that every ingest
gateway still serves. They once ran one after the other in one ``try``, so a gateway
that answered late made the cycle skip processing. Here each repeated step is a task
of its own: a step that fails or waits on something slow is reported and delays only
its own next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from flowray.actors.directory import lookup_actor
from flowray.actors.names import gateway_name
from flowray.config import Settings

Step = Callable[[], Awaitable[object]]
# (actor name, namespace, timeout in seconds) -> the actor's handle; ValueError if no
# such actor runs, TimeoutError if Ray's GCS does not answer in time.
Lookup = Callable[[str, str, float], Awaitable[Any]]
log = logging.getLogger("flowray.processor")


class Schedule:
    def __init__(
        self,
        on_error: Callable[[str, Exception], None],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.on_error = on_error  # (what failed, the error): the step runs again anyway
        self.sleep = sleep
        self._steps: list[tuple[str, float, Step]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, interval_s: float, name: str, step: Step) -> None:
        """Run ``step`` every ``interval_s`` once started (the first run after one wait)."""
        self._steps.append((name, interval_s, step))

    def start(self) -> None:
        """Start every step's task, once: later calls, even after ``stop``, do nothing."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._repeat(name, interval_s, step))
                for name, interval_s, step in self._steps
            ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _repeat(self, name: str, interval_s: float, step: Step) -> None:
        while True:
            await self.sleep(interval_s)
            try:
                await step()
            except Exception as exc:  # an operating error: report, retry next time
                self.on_error(name, exc)


class GatewaySupervisor:
    """Ray restarts a crashed gateway actor but not the server its ``start`` began:
    someone has to notice and start it again."""

    def __init__(self, settings: Settings, lookup: Lookup = lookup_actor) -> None:
        self.settings = settings
        self.lookup = lookup

    async def keep_gateways(self) -> bool:
        """Start each ingest gateway's server if its actor came back from a crash
        without it; True if one had to."""
        restarted = False
        timeout = self.settings.rpc_timeout_s
        for i in range(self.settings.gateways):
            try:
                gateway = await self.lookup(gateway_name(i), self.settings.namespace, timeout)
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
