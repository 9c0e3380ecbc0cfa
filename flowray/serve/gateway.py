"""The ingest gateway: the same app as the Serve deployment, under plain uvicorn.

Ray Serve's proxy costs milliseconds per request on a small machine (about 240
trivial requests/s on the 2-core reference machine, against thousands for the same
app under uvicorn), which is fine for queries but not for trackers that send one
event per request. A gateway is a Ray actor that runs the app factory under uvicorn
on the ingest port and micro-batches writes into the shard groups; Serve keeps
serving the whole API on the main port.

``Settings.gateways`` of them share the port: each listens with SO_REUSEPORT and the
kernel spreads new connections over them, so request parsing (the gateway's main
cost) runs on several cores, and a rolling restart replaces one gateway while the
others keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import ray
import uvicorn

from flowray.actors import memtrim
from flowray.api.app import IngestFastPath
from flowray.serve.deployment import build_app

log = logging.getLogger("flowray.gateway")

LISTEN_BACKLOG = 4096
# Trackers and batch clients keep connections open; a short keep-alive makes clients
# race the server's close and see resets.
KEEP_ALIVE_S = 75


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) that other gateways may bind too (SO_REUSEPORT;
    only sockets that all set it share a port, so a stranger's cannot join)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def require_port_free(host: str, port: int) -> None:
    """Raise OSError if something listens on (host, port) already: the gateways share
    their port with SO_REUSEPORT, which would otherwise let a second cluster started
    by the same user on the same port quietly take half of the first one's traffic."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: connections of a cluster just stopped, still in TIME_WAIT, do
        # not hold the port; a listening socket still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(
                exc.errno, f"the ingest port {host}:{port} is in use: {exc.strerror}"
            ) from exc


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
        self._warm: asyncio.Task[int] | None = None

    async def start(self) -> int:
        """Serve until stopped; returns once the socket is listening, and finds the
        groups' masters and connects to them meanwhile (RayIngest.warm)."""
        if self._task is None:
            app = build_app()
            try:  # before the first request, not in it; only a head start
                app.state.warm()
            except Exception:
                log.warning("warming the ingest path failed", exc_info=True)
            config = uvicorn.Config(
                IngestFastPath(app),
                host=self.host,
                port=self.port,
                access_log=False,
                log_level="warning",
                loop="none",
                lifespan="off",
                backlog=LISTEN_BACKLOG,
                timeout_keep_alive=KEEP_ALIVE_S,
            )
            self._server = _Server(config)
            sock = listen_socket(self.host, self.port)  # raises if the port is taken
            self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
            self._trim = self._trim or asyncio.create_task(memtrim.trim_forever())
            warm = getattr(app.state.ingest, "warm", None)
            if warm is not None:
                self._warm = asyncio.create_task(warm())
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
        for task in (self._trim, self._warm):
            if task is not None:
                task.cancel()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)

    def ping(self) -> dict[str, Any]:
        warm, warmed = self._warm, None
        if warm is not None and warm.done() and not warm.cancelled() and not warm.exception():
            warmed = warm.result()
        return {
            "port": self.port,
            "pid": os.getpid(),
            "started": bool(self._server and self._server.started),
            # groups whose master it connected to ahead of the first write; None: not
            # done (RayIngest.warm)
            "warmed": warmed,
        }
