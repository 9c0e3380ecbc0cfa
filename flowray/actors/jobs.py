"""Long jobs run in the background: their ids, progress and results.

A job (re-processing, rollback) takes longer than a caller should wait, so it starts
at once and is polled by id. Jobs take turns with the processing cycle on one lock, so
a job sees a version nobody publishes into meanwhile. Only the JOBS_KEPT most recent
finished jobs are remembered, and none survives a restart of the processor.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

JOBS_KEPT = 20  # finished jobs remembered for their results
# What a job does, given its state to report progress in ("done", "total"); its result.
JobWork = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
log = logging.getLogger("flowray.processor")


def now_ms() -> int:
    return int(time.time() * 1000)


class JobRunner:
    def __init__(
        self,
        lock: asyncio.Lock,
        on_failure: Callable[[], None] = lambda: None,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.lock = lock
        self.on_failure = on_failure  # e.g. forget the masters: one may have moved
        self.clock_ms = clock_ms
        self._jobs: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, kind: str, params: dict[str, Any], work: JobWork) -> dict[str, Any]:
        """Start ``work`` as a job (it runs once the lock is free); the job's state."""
        job_id = uuid.uuid4().hex[:12]
        state: dict[str, Any] = {
            "job": job_id,
            "kind": kind,
            "params": params,
            "state": "running",
            "done": 0,
            "total": None,
            "started_ms": self.clock_ms(),
            "result": None,
            "error": None,
        }
        finished = [j for j, st in self._jobs.items() if st["state"] != "running"]
        for old in finished[: max(0, len(finished) - JOBS_KEPT + 1)]:
            del self._jobs[old]
        self._jobs[job_id] = state
        task = asyncio.create_task(self._run(state, work))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        return dict(state)

    async def _run(self, state: dict[str, Any], work: JobWork) -> None:
        try:
            async with self.lock:
                state["result"] = await work(state)
            state["state"] = "done"
        except Exception as exc:  # reported to whoever polls the job
            state["error"] = f"{type(exc).__name__}: {exc}"
            state["state"] = "failed"
            log.warning(
                "%s job %s failed: %s", state["kind"], state["job"], state["error"], exc_info=True
            )
            self.on_failure()
        finally:
            state["seconds"] = round((self.clock_ms() - state["started_ms"]) / 1000, 3)

    def get(self, job_id: str) -> dict[str, Any] | None:
        state = self._jobs.get(job_id)
        return None if state is None else dict(state)

    def running(self) -> list[dict[str, Any]]:
        return [dict(st) for st in self._jobs.values() if st["state"] == "running"]
