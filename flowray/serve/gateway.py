"""The ingest gateway: the same app as the Serve deployment, under plain uvicorn.

Ray Serve's proxy costs milliseconds per request on a small machine (about 240
trivial requests/s on the 2-core reference machine, against thousands for the same
app under uvicorn), which is fine for queries but not for trackers that send one
event per request. The gateway is a Ray actor per node that runs the app factory
under uvicorn on its own port and micro-batches writes into the shard groups; Serve
keeps serving the whole API on the main port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import ray
import uvicorn

from flowray import memtrim
from flowray.serve.app import IngestFastPath
from flowray.serve.deployment import build_app

GATEWAY_NAME = "flowray-gateway"
# Trackers and batch clients keep connections open; a short keep-alive makes clients
# race the server's close and see resets.
KEEP_ALIVE_S = 75


class _Server(uvicorn.Server):
    """uvicorn without signal handlers: Ray owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Gateway:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._trim: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Serve until stopped; returns once the socket is listening."""
        if self._task is None:
            config = uvicorn.Config(
                IngestFastPath(build_app()),
                host=self.host,
                port=self.port,
                access_log=False,
                log_level="warning",
                loop="none",
                lifespan="off",
                backlog=4096,
                timeout_keep_alive=KEEP_ALIVE_S,
            )
            self._server = _Server(config)
            self._trim = asyncio.create_task(memtrim.trim_forever())
            self._task = asyncio.create_task(self._server.serve())
            for _ in range(200):
                if self._server.started:
                    break
                if self._task.done():
                    self._task.result()  # raises what stopped it
                await asyncio.sleep(0.05)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._trim is not None:
            self._trim.cancel()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)

    def ping(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "pid": os.getpid(),
            "started": bool(self._server and self._server.started),
        }
